"""Gradients of the next-token loss on calibration windows: what the taylor
(influence) scores of ``prune`` and ``sparsify`` are made of."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["loss_gradients"]


@contextmanager
def loss_gradients(model: nn.Module, windows: torch.Tensor, *, max_samples: int, batch_size: int,
                   only: Iterable[nn.Parameter] | None = None) -> Iterator[None]:
    """Inside the block, ``.grad`` holds dL/dθ summed over the first ``max_samples`` windows, for every
    parameter, or ``only`` those given; afterwards the gradients are dropped and each parameter's
    ``requires_grad`` is restored."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    chosen = None if only is None else {id(p) for p in only}
    model.zero_grad(set_to_none=True)
    try:
        for p in params:
            p.requires_grad_(chosen is None or id(p) in chosen)
        with torch.enable_grad():
            count = min(len(windows), max_samples)
            for start in range(0, count, batch_size):
                batch = windows[start : min(start + batch_size, count)].to(params[0].device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        yield
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
