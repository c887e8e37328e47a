"""Learned rounding by signed gradient descent (SignRound, the method of
AutoRound: Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient
Descent for the Quantization of LLMs").

Each linear ``W [N, K]`` of a decoder layer gets trainable

* rounding offsets ``V [N, K]`` in ``[-0.5, 0.5]`` (0 = round to nearest),
  added before rounding: ``code = clamp(round(W / s + V) + z, 0, maxq)``;
* clipping factors per group in ``[0.5, 1]`` (1 = the full range): ``α`` on
  the group's maximum and ``β`` on its minimum (asymmetric grids), or one
  ``α`` on ``max |w|`` (symmetric grids).

Or, started from an existing quantization (``start``: e.g. GPTQ's codes and
grid, natural groups), its grid is kept and only the offsets learn: they
start where they reproduce its codes, at the values it rounded when given
(``rounded``: for GPTQ, the weights its updates led to, so that the weights
it nearly rounded the other way are the ones a small step flips), and move
at most ``0.5`` either way from there.

The grid is exactly that of :mod:`llmslim.quant.quantizer` (``find_params``
with ``minmax``, the same symmetric/asymmetric conventions, ``zero >= 1``,
``[-1, 1]`` for an empty group, partial last groups): with ``V = 0`` and
``α = β = 1`` the codes, scales and zeros are those of
:func:`~llmslim.quant.quantizer.rtn_quantize_weight`, bit for bit. Rounding
uses the straight-through estimator (identity gradient), so gradients reach
``V`` and, through the scale and the zero point, ``α`` and ``β``.

:func:`optimise_layer` minimises the squared error between the layer's output
with the fake-quantized weights and given target outputs, one batch of
calibration windows per iteration, with ``p -= lr_t * sign(grad)`` and a
learning rate decaying linearly to 0; it keeps the parameters of the lowest
loss seen (each batch's loss relative to its round-to-nearest loss, so that
easy and hard batches compare) and never returns worse than round-to-nearest
on the calibration data (nor worse than the start it was given).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from llmslim.calibration import LayerInputs
from llmslim.modeling import is_conv1d, linear_weight
from llmslim.quant.quantizer import QuantizedWeight, QuantSpec, grid_from_range

__all__ = ["round_ste", "group_ranges", "learned_grid", "LearnedRounding", "RoundingStats", "optimise_layer",
           "OFFSET_BOUND", "CLIP_RANGE"]

OFFSET_BOUND = 0.5         # V in [-OFFSET_BOUND, OFFSET_BOUND] (added to a given start's unrounded weights)
CLIP_RANGE = (0.5, 1.0)    # α, β in this range


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient (straight-through estimator). The forward value is
    exactly ``torch.round(x)``: ``round(x) - x`` is exact, and so is adding it back."""
    return x + (torch.round(x) - x).detach()


def group_ranges(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xmin, xmax)`` ``[G, N]`` of the natural groups of ``w [N, K]``, each range widened to
    contain 0 (as :func:`~llmslim.quant.quantizer.find_params`); a partial last group has its own."""
    n, k = w.shape
    gs, groups = spec.groups_for(k)
    full = k // gs
    parts = [w[:, :full * gs].reshape(n, full, gs)] if full else []
    if full < groups:
        parts.append(w[:, full * gs:].unsqueeze(1))
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    xmin = torch.cat([p.amin(dim=2) for p in parts], dim=1).t()     # [G, N]
    xmax = torch.cat([p.amax(dim=2) for p in parts], dim=1).t()
    return torch.minimum(xmin, zero).contiguous(), torch.maximum(xmax, zero).contiguous()


def learned_grid(xmin: torch.Tensor, xmax: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor | None,
                 maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the ranges ``[β·xmin, α·xmax]`` (symmetric: ``α·max|x|``), differentiable in
    ``α`` and ``β``; the forward values are those of the quantizer's grid for the same ranges."""
    xmin = xmin * (alpha if sym or beta is None else beta)
    return grid_from_range(xmin, xmax * alpha, maxq, sym, rounding=round_ste)


class LearnedRounding:
    """The trainable rounding of one linear: ``offsets`` (V), ``max_scale`` (α) and, for asymmetric
    grids, ``min_scale`` (β), all at their round-to-nearest values initially; from a ``start``, only
    the offsets, added to its weights before rounding (``rounded``, else its codes)."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, *, transposed: bool = False,
                 dtype: torch.dtype | None = None, start: QuantizedWeight | None = None,
                 rounded: torch.Tensor | None = None):
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
        w = weight.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError("the weight contains NaN or infinite values")
        self.weight, self.spec = w, spec
        self.transposed, self.dtype = transposed, dtype or weight.dtype
        gs, _ = spec.groups_for(w.shape[1])
        self.g_idx = torch.arange(w.shape[1], device=w.device) // gs
        self.offsets = torch.zeros_like(w, requires_grad=True)
        self.base: tuple[torch.Tensor, torch.Tensor] | None = None   # a start's (scales, zeros) [G, N]
        self.point: torch.Tensor | None = None   # a start's weights in steps of its grid, before rounding
        if start is None:
            self.xmin, self.xmax = group_ranges(w, spec)
            self.max_scale = torch.ones_like(self.xmax, requires_grad=True)
            self.min_scale = None if spec.sym else torch.ones_like(self.xmin, requires_grad=True)
            return
        self._check_start(start, rounded)
        scale, zero = start.scales.to(w.device, torch.float32), start.zeros.to(w.device, torch.float32)
        self.base = (scale, zero)
        self.point = (start.codes.to(w.device, torch.float32) - zero[self.g_idx].t() if rounded is None
                      else rounded.to(w.device, torch.float32) / scale[self.g_idx].t())
        self.max_scale = self.min_scale = None

    def _check_start(self, start: QuantizedWeight, rounded: torch.Tensor | None) -> None:
        for what, shape in (("codes", start.codes.shape), ("rounded weights", None if rounded is None else
                                                             rounded.shape)):
            if shape is not None and tuple(shape) != tuple(self.weight.shape):
                raise ValueError(f"the start's {what} have shape {tuple(shape)}, the weight {tuple(self.weight.shape)}")
        if start.spec.bits != self.spec.bits or not torch.equal(start.g_idx.to(self.g_idx), self.g_idx):
            raise ValueError("the start must use the same bits and natural groups of the same size "
                             "(GPTQ: static groups or no act-order)")

    @classmethod
    def for_module(cls, module: nn.Module, spec: QuantSpec, *, weight: torch.Tensor | None = None,
                   start: QuantizedWeight | None = None, rounded: torch.Tensor | None = None) -> LearnedRounding:
        """The rounding of a linear layer (``nn.Linear`` or GPT-2's transposed ``Conv1D``); ``weight``
        (``[out, in]``, default the module's) when the module's own was already replaced by ``start``'s."""
        return cls(linear_weight(module) if weight is None else weight, spec, transposed=is_conv1d(module),
                   dtype=module.weight.dtype, start=start, rounded=rounded)

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in (self.offsets, self.max_scale, self.min_scale) if p is not None]

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, zeros)`` ``[G, N]``."""
        if self.base is not None:
            return self.base
        return learned_grid(self.xmin, self.xmax, self.max_scale, self.min_scale, self.spec.maxq, self.spec.sym)

    def _unrounded(self, s: torch.Tensor) -> torch.Tensor:
        """The weights in steps of the grid ``s`` (``[N, K]``), plus the offsets, before rounding."""
        return (self.weight / s if self.point is None else self.point) + self.offsets

    def fake_weight(self) -> torch.Tensor:
        """The quantize-dequantized weight ``[N, K]`` (float32), differentiable in V, α and β."""
        scale, zero = self.grid()
        s, z = scale[self.g_idx].t(), zero[self.g_idx].t()
        codes = torch.clamp(round_ste(self._unrounded(s)) + z, 0, self.spec.maxq)
        return s * (codes - z)

    def module_weight(self) -> torch.Tensor:
        """:meth:`fake_weight` in the module's own layout and dtype."""
        w = self.fake_weight().to(self.dtype)
        return w.t() if self.transposed else w

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The codes and grid of the current parameters, in the quantizer's conventions."""
        scale, zero = self.grid()
        s, z = scale[self.g_idx].t(), zero[self.g_idx].t()
        codes = torch.clamp(torch.round(self._unrounded(s)) + z, 0, self.spec.maxq)
        return QuantizedWeight(codes=codes.to(torch.uint8), scales=scale.contiguous(),
                               zeros=zero.to(torch.int32).contiguous(), g_idx=self.g_idx.to(torch.int32),
                               spec=self.spec)

    @torch.no_grad()
    def sign_step(self, grads: list[torch.Tensor | None], lr: float) -> None:
        """``p -= lr * sign(grad)`` (``grads`` in the order of :meth:`parameters`), then back into the
        allowed ranges."""
        for p, g in zip(self.parameters(), grads):
            if g is not None:
                p.sub_(torch.sign(g), alpha=lr)
        self.offsets.clamp_(-OFFSET_BOUND, OFFSET_BOUND)
        for p in self.parameters()[1:]:
            p.clamp_(*CLIP_RANGE)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    @torch.no_grad()
    def restore(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self.parameters(), values):
            p.copy_(v)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the start: round-to-nearest (V = 0, α = β = 1), or the given start's codes and grid."""
        self.offsets.zero_()
        for p in self.parameters()[1:]:
            p.fill_(1.0)


@dataclass
class RoundingStats:
    """One layer's optimisation: summed squared output errors over all calibration batches at
    the start (round-to-nearest, or the given start) and at the kept parameters, and the targets'
    summed squares."""

    start_error: float
    error: float
    target_norm2: float
    iters: int
    best_iter: int   # -1: the start was kept
    seconds: float

    def row(self) -> dict:
        """For the report: relative output errors ``||Y_q - Y|| / ||Y||`` at the start and after."""
        def rel(e: float) -> float:
            return round((e / self.target_norm2) ** 0.5, 6) if self.target_norm2 > 0 else 0.0
        return {"start_relative_error": rel(self.start_error), "relative_error": rel(self.error),
                "error_ratio": round(self.error / self.start_error, 6) if self.start_error > 0 else 1.0,
                "iters": self.iters, "best_iter": self.best_iter, "seconds": round(self.seconds, 3)}


def _squared_error(layer: nn.Module, roundings: dict[str, LearnedRounding], inputs: LayerInputs,
                   target: torch.Tensor, batch: int) -> torch.Tensor:
    """Summed squared error of the layer's output on batch ``batch`` with the fake-quantized weights
    (``roundings`` keyed by each linear's path inside the layer)."""
    weights = {f"{path}.weight": r.module_weight() for path, r in roundings.items()}
    out = inputs.call(partial(_call_with, layer, weights), batch)   # LayerInputs moves the batch where needed
    out = out[0] if isinstance(out, (tuple, list)) else out
    return (out.float() - target.to(out.device).float()).pow(2).sum()


def _call_with(layer: nn.Module, weights: dict[str, torch.Tensor], *args, **kwargs):
    """``layer(*args, **kwargs)`` with ``weights`` in place of its parameters of those names."""
    return torch.func.functional_call(layer, weights, args, kwargs)


@contextmanager
def _frozen(layer: nn.Module) -> Iterator[None]:
    """The layer's own parameters need no gradient while the roundings learn; their flags come back after."""
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def _errors(layer, roundings, inputs: LayerInputs, targets: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([_squared_error(layer, roundings, inputs, t, b) for b, t in enumerate(targets)]).double().cpu()


def _schedule(batches: int, iters: int, seed: int) -> list[int]:
    """The batch of each iteration: a fresh seeded permutation of the batches per pass."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < iters:
        order += torch.randperm(batches, generator=gen).tolist()
    return order[:iters]


def optimise_layer(layer: nn.Module, roundings: dict[str, LearnedRounding], inputs: LayerInputs,
                   targets: list[torch.Tensor], *, iters: int, lr: float, seed: int = 0) -> RoundingStats:
    """Learn the roundings of ``layer``'s linears so that its outputs on ``inputs`` approach ``targets``
    (one tensor per batch of ``inputs``). The layer's own parameters are not touched; the kept
    parameters stay in ``roundings`` (their start when nothing beat it)."""
    if len(targets) != len(inputs.hidden) or not targets:
        raise ValueError(f"expected one target per input batch, got {len(targets)} for {len(inputs.hidden)}")
    start_time = time.perf_counter()
    start = _errors(layer, roundings, inputs, targets)
    norm2 = float(sum(t.float().pow(2).sum().item() for t in targets))
    best_ratio, best_iter, best = 1.0, -1, [r.snapshot() for r in roundings.values()]
    params = [r.parameters() for r in roundings.values()]
    with _frozen(layer), torch.enable_grad():
        for t, b in enumerate(_schedule(len(targets), iters, seed) if start.sum() > 0 else []):
            loss = _squared_error(layer, roundings, inputs, targets[b], b)
            ratio = loss.item() / float(start[b]) if start[b] > 0 else 1.0
            if ratio < best_ratio:   # the parameters this loss was measured at, before their update
                best_ratio, best_iter, best = ratio, t, [r.snapshot() for r in roundings.values()]
            grads = iter(torch.autograd.grad(loss, [p for ps in params for p in ps], allow_unused=True))
            for r, ps in zip(roundings.values(), params):
                r.sign_step([next(grads) for _ in ps], lr * (1 - t / iters))
    for r, values in zip(roundings.values(), best):
        r.restore(values)
    final = _errors(layer, roundings, inputs, targets)
    if final.sum() > start.sum():   # the best batch ratio did not carry over to all the batches
        for r in roundings.values():
            r.reset()
        final, best_iter = start, -1
    return RoundingStats(start_error=float(start.sum()), error=float(final.sum()), target_norm2=norm2,
                         iters=iters, best_iter=best_iter, seconds=time.perf_counter() - start_time)
