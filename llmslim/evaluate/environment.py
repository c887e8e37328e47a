"""Where the numbers were measured: versions, device, CPU model, torch's threads."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import transformers

from llmslim import __version__
from llmslim.report import Environment

__all__ = ["cpu_model", "environment_info"]

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: str | None, processor: str) -> str:
    """The first "model name" of /proc/cpuinfo's text, else ``processor``, else "unknown"."""
    for line in (cpuinfo or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name" and value.strip():
            return value.strip()
    return processor.strip() or "unknown"


def _read_cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def environment_info(device: torch.device) -> Environment:
    """The environment block of report.json for a run on ``device``."""
    device = torch.device(device)
    cpu = cpu_model(_read_cpuinfo(), platform.processor())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    # `device` keeps its historical form: "cuda:0 (NVIDIA ...)" or "cpu (x86_64)"
    name = gpu if gpu is not None else platform.processor() or "cpu"
    return Environment(python=platform.python_version(), torch=torch.__version__,
                       transformers=transformers.__version__, llmslim=__version__,
                       device=f"{device} ({name})", platform=platform.platform(),
                       torch_threads=torch.get_num_threads(), cpu=cpu, gpu=gpu)
