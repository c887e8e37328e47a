"""Peak memory during a block of work: max allocated on CUDA, the process's
resident set (RSS) high-water mark on CPU."""

from __future__ import annotations

import threading
from pathlib import Path

import psutil
import torch

__all__ = ["PeakMemory"]

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


class PeakMemory:
    """Context manager; ``.peak_bytes`` holds the peak after the block."""

    def __init__(self, device: torch.device, interval_s: float = 0.02):
        self.device, self.interval, self.peak_bytes = device, interval_s, 0
        self._stop = threading.Event()
        self._thread = None
        self._hwm = False

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._hwm = _reset_hwm()
        self.peak_bytes = psutil.Process().memory_info().rss
        if not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        rss = psutil.Process().memory_info().rss
        hwm = _vm_hwm() if self._hwm else None
        self.peak_bytes = max(self.peak_bytes, rss, hwm or 0)
