"""Peak memory during a block of work: max allocated on CUDA, the process's
resident set (RSS) high-water mark on CPU; and, on every device, the host's
(``host_peak_bytes``).

The host peak is the kernel's RSS high-water mark (``VmHWM``), reset at the
start of the block by writing 5 to ``/proc/self/clear_refs`` (Linux); where
that is not allowed, RSS is sampled every ``interval_s`` instead (a spike
shorter than that can be missed). Blocks may nest: before a nested block
resets the mark, every enclosing block takes the mark reached so far. An
outermost block first hands the memory freed so far back to the system
(glibc ``malloc_trim``), so that its peak is its own work's, not what
earlier work left in the allocator."""

from __future__ import annotations

import functools
import gc
import threading
from pathlib import Path

import psutil
import torch

__all__ = ["PeakMemory", "release_host_memory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Linux lets a process reset its RSS high-water mark (clear_refs = 5)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm() is not None


@functools.lru_cache(maxsize=1)
def _libc_function(function: str):
    """A glibc function (``malloc_trim``), or None (another C library, or none found)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    return _libc_function("malloc_trim")


def release_host_memory() -> bool:
    """Hand the memory freed so far back to the system (glibc's ``malloc_trim``); False where there is none.
    Tokenizing a whole text leaves most of its peak (~150 bytes per character) held by the allocator."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_OPEN: list[PeakMemory] = []  # blocks being measured, outermost first


class PeakMemory:
    """Context manager; ``.peak_bytes`` holds the device's peak after the block (the host's on CPU),
    ``.host_peak_bytes`` the host's (RSS) on every device, ``.host_method`` how it was measured."""

    def __init__(self, device: torch.device, interval_s: float = 0.02):
        self.device, self.interval, self.peak_bytes = device, interval_s, 0
        self.host_peak_bytes = 0
        self.host_method = "VmHWM"
        self._device_seen = 0  # the CUDA peak reached before a nested block reset the statistics
        self._stop = threading.Event()
        self._thread = None
        self._hwm = False

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval):
            self.host_peak_bytes = max(self.host_peak_bytes, proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if not _OPEN:  # an outermost block starts without what earlier work freed: its peak is its own
            release_host_memory()
        mark = _vm_hwm()
        for outer in _OPEN:  # the reset below would lose what the enclosing blocks reached so far
            outer.host_peak_bytes = max(outer.host_peak_bytes, mark or 0)
        self._hwm = _reset_hwm()
        self.host_peak_bytes = psutil.Process().memory_info().rss
        if not self._hwm:
            self.host_method = f"RSS sampled every {self.interval * 1000:.0f} ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for outer in _OPEN:
                if outer.device == self.device:
                    outer._device_seen = max(outer._device_seen, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        _OPEN.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        rss = psutil.Process().memory_info().rss
        hwm = _vm_hwm() if self._hwm else None
        self.host_peak_bytes = max(self.host_peak_bytes, rss, hwm or 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device), self._device_seen)
            return
        self.peak_bytes = self.host_peak_bytes
