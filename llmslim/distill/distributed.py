"""torch.distributed helpers: start the process group from torchrun's
environment, ask where this process stands, and small collectives that
degrade to no-ops in a single process.

Under ``torchrun --nproc-per-node N`` every process runs the whole recipe;
:func:`init_distributed` is called once at startup. On CUDA each process uses
the GPU of its ``LOCAL_RANK`` (made the current device, so ``cuda`` means it).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "world", "barrier", "all_reduce_sum", "broadcast_object", "agree"]


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise the default process group from the env vars torchrun sets
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``).

    Returns ``(rank, world_size)``: ``(0, 1)`` without a ``WORLD_SIZE`` above 1
    (nothing is initialised then). The backend is nccl with CUDA, gloo
    otherwise, unless ``backend`` names one. Calling it again is harmless.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (in place; the tensor itself in one process)."""
    if world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(problem: str | None) -> str | None:
    """The first rank's problem (None: no rank has one), on every rank, so that all ranks raise together
    instead of leaving the others waiting in a collective."""
    if world()[1] == 1:
        return problem
    problems: list = [None] * world()[1]
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)
