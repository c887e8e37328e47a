"""Small runtime helpers of the distillation loop: signals, atomic
checkpoint files, sharded scalars, activation checkpointing, autocast,
the optimizer, fixed sparsity masks, and the perplexity over windows shared
among ranks."""

from __future__ import annotations

import math
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

__all__ = ["stop_on_signals", "write_atomic", "read_state", "scalar", "set_checkpointing", "autocast_dtype",
           "adamw", "zero_masks", "apply_masks", "perplexity_over_ranks"]


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


def read_state(path: Path | None, identity: dict) -> dict | None:
    """The training checkpoint at ``path`` when it was written for ``identity``, else None (start over).
    Memory-mapped: a rank reads only the tensors it uses (the others take rank 0's under FSDP)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint only costs a restart
        LOGGER.warning("distill: cannot read %s (%s); starting over", path, exc)
        return None
    if state.get("identity") != identity:
        LOGGER.warning("distill: %s was written for another config, data or model; starting over", path)
        return None
    return state


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


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``autocast: mode`` on ``device`` (auto: bf16 on CUDA devices that support it)."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters, weight decay on matrices only (not norms or biases)."""
    decay, rest = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else rest).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def zero_masks(layers: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(weight, its exact zeros) of every linear under ``layers`` that has zeros."""
    from llmslim.modeling import find_linears

    masks = []
    for module in find_linears(layers).values():
        zeros = module.weight.data == 0
        if bool(zeros.any()):
            masks.append((module.weight, zeros))
    return masks


@torch.no_grad()
def apply_masks(masks: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for weight, zeros in masks:
        weight.data.masked_fill_(zeros, 0.0)


@torch.no_grad()
def perplexity_over_ranks(module: nn.Module, windows: torch.Tensor, micro: int, device: torch.device) -> float:
    """exp(mean next-token NLL) over ``windows``, dealt round-robin to the ranks, ``micro`` at a time."""
    from llmslim.distill.distributed import all_reduce_sum, world
    from llmslim.evaluate.perplexity import window_nll

    rank, size = world()
    was_training = module.training
    module.eval()
    n = windows.shape[0]
    per_rank = -(-n // size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, per_rank, micro):
        idx = [(start + j) * size + rank for j in range(micro) if start + j < per_rank]
        real = [i for i in idx if i < n]
        batch = windows[real or [0]].to(device)  # a rank with no window left still joins (FSDP)
        nll, tokens = window_nll(module, batch)
        if real:
            sums[0] += nll.double()
            sums[1] += tokens
    all_reduce_sum(sums)
    module.train(was_training)
    return math.exp(float(sums[0] / sums[1]))
