"""Small runtime helpers of the distillation loop: signals, atomic
checkpoint files, sharded scalars, activation checkpointing."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmslim.progress import LOGGER

__all__ = ["stop_on_signals", "write_atomic", "scalar", "set_checkpointing"]


@contextmanager
def stop_on_signals(request_stop: Callable[[int], None]):
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. A second one acts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        LOGGER.warning("distill: %s received; stopping after this step with a checkpoint (again to stop now)",
                       signal.Signals(signum).name)
        request_stop(signum)
        signal.signal(signum, previous[signum])

    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        previous[sig] = old if old is not None else signal.SIG_DFL
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def write_atomic(payload: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def scalar(value) -> float:
    value = value.full_tensor() if hasattr(value, "full_tensor") else value
    return float(value)


def set_checkpointing(model: nn.Module, enable: bool) -> None:
    """Activation (gradient) checkpointing on or off; transformers 5 renamed the methods."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
