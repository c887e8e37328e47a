"""Energy counters: NVML's total-energy counter on NVIDIA GPUs, Intel RAPL on
CPU where readable. When neither is usable the meter says why, and the
reported energy is null: never an estimate."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["EnergyMeter", "open_energy_meter"]

RAPL = Path("/sys/class/powercap/intel-rapl:0")


class EnergyMeter:
    """Reads a cumulative energy counter in joules."""

    def __init__(self, source: str | None, reader=None, reason: str | None = None, wrap_j: float | None = None):
        self.source, self._reader, self.reason, self._wrap = source, reader, reason, wrap_j

    @property
    def available(self) -> bool:
        return self._reader is not None

    def read(self) -> float:
        return self._reader()

    def delta(self, start: float, end: float) -> float:
        if end < start and self._wrap:
            return end + self._wrap - start
        return end - start


def _nvml_meter(device: torch.device) -> EnergyMeter:
    try:
        import pynvml
    except ImportError:
        return EnergyMeter(None, reason="nvidia-ml-py (pynvml) is not installed")
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError as exc:
        return EnergyMeter(None, reason=f"NVML total-energy counter unavailable: {exc}")
    return EnergyMeter("nvml", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0)


def _rapl_meter() -> EnergyMeter:
    counter = RAPL / "energy_uj"
    if not counter.exists():
        return EnergyMeter(None, reason="no RAPL counter on this machine (/sys/class/powercap/intel-rapl:0)")
    try:
        int(counter.read_text())
        wrap = int((RAPL / "max_energy_range_uj").read_text()) / 1e6
    except (OSError, ValueError) as exc:
        return EnergyMeter(None, reason=f"RAPL counter not readable: {exc}")
    return EnergyMeter("rapl-package", lambda: int(counter.read_text()) / 1e6, wrap_j=wrap)


def open_energy_meter(device: torch.device) -> EnergyMeter:
    """The best energy counter for ``device``, or an unavailable meter with a reason."""
    if device.type == "cuda":
        return _nvml_meter(device)
    return _rapl_meter()
