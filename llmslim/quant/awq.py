"""AWQ (Lin et al., 2023, activation-aware weight quantization) as pure functions.

A group of linears that read the same input ``x`` (q/k/v after the attention
norm, gate/up after the MLP norm, o after v, down after up) gets one positive
scale per input channel, ``s``. The group's weights become ``W·diag(s)`` and
the op producing ``x`` (a norm's weight and bias, or the output rows of the
previous linear) is divided by ``s``, so the full-precision function is
unchanged while the channels that carry large activations get a finer grid.

* :func:`search_scales` tries ``s = mean|x|^α`` (``duo``: ``mean|x|^α /
  mean|ŵ|^(1-α)``, ``ŵ`` the weights normalised by their group maximum, as
  AutoAWQ), ``α = i / grid``, each normalised to ``sqrt(max·min) = 1``, and
  also ``s = 1`` (plain RTN), so it never chooses scales worse than none.
* The objective is the output error of **the group's own linears** (their
  outputs concatenated), ``Σ_l ‖X (Q(W_l·diag(s))·diag(s)⁻¹ − W_l)ᵀ‖²``, with
  ``Q`` the group-wise min-max round-to-nearest of the step, or the rounding
  that will really be applied (:func:`search_scales_with`: e.g. GPTQ on the
  scaled weights and the scaled Hessian ``diag(s)⁻¹ H diag(s)⁻¹``, so that the
  scales are chosen for GPTQ's error, not for a rounding it will not use). The original AWQ
  measures the output of the block the group feeds (the attention output for
  q/k/v); the linears' own outputs need no rerun of the block and are
  evaluated exactly on all calibration tokens through ``H = 2XᵀX/n`` (the
  Hessian GPTQ accumulates): ``‖XDᵀ‖²/n = tr(D H Dᵀ)/2``.
* :func:`search_clip` then shrinks each (output row, weight group) range by
  ratios ``1 − i/grid`` above ``1 − MAX_SHRINK`` (1 to 0.55 with a grid of 20)
  and keeps the one with the least error of that group's partial output,
  ``dᵀ H_gg d`` (AWQ's clip search, on all tokens instead of a subsample).
* Folding: :func:`fold_into_norm` (weight ``w``, bias, and Gemma's ``x·(1+w)``
  norms via ``offset``), :func:`fold_into_rows` (a previous linear's output
  rows and bias) and :func:`scale_columns` (the linears reading the input).

All math is in float32 on the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from llmslim.quant.quantizer import QuantizedWeight, QuantSpec, dequantize, find_params, quantize, rtn_quantize_weight

__all__ = ["MAX_SHRINK", "ScaleSearch", "Rounder", "output_error", "weight_channel_mean", "candidate_scales",
           "search_scales", "search_scales_with", "search_clip", "clip_range", "fold_into_norm", "fold_into_rows", "scale_columns",
           "scaled_hessian"]

MAX_SHRINK = 0.5     # the clip search tries ranges above 1 - MAX_SHRINK of the full one (AutoAWQ's)
MIN_STAT = 1e-4      # floor of mean |x| and of the scales (dead channels)


@dataclass(frozen=True)
class ScaleSearch:
    """The chosen scales of one group. ``alpha`` is None when ``s = 1`` (no scaling) was best;
    ``error``/``base_error`` are the objective with the chosen scales and with none; ``reference``
    is ``Σ tr(W H Wᵀ)``, for relative errors."""

    alpha: float | None
    scales: torch.Tensor
    error: float
    base_error: float
    reference: float
    rounded: list[QuantizedWeight] = field(default_factory=list)       # the winner's, per linear
    base_rounded: list[QuantizedWeight] = field(default_factory=list)  # with s = 1, per linear

    @property
    def relative_error(self) -> float:
        return (self.error / max(self.reference, 1e-30)) ** 0.5

    @property
    def relative_base_error(self) -> float:
        return (self.base_error / max(self.reference, 1e-30)) ** 0.5


def _minmax(spec: QuantSpec) -> QuantSpec:
    return QuantSpec(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, scale_search="minmax")


def _trace(d: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(D H Dᵀ)``."""
    return float(((d @ h) * d).sum().clamp_min(0))


def output_error(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> float:
    """``tr(D H Dᵀ)`` with ``D = Q(W·diag(s))·diag(s)⁻¹ − W``: the output error (times 2/n) of the
    scaled, min-max quantized ``w [N, K]`` on the inputs behind ``h [K, K]``."""
    q = rtn_quantize_weight(w * scales, _minmax(spec)).dequantize().to(w.device) / scales
    return _trace(q - w, h)


def weight_channel_mean(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Mean over rows of ``|w|`` divided by its (row, group) maximum, per input channel ``[K]``."""
    k = w.shape[1]
    gs, groups = spec.groups_for(k)
    out = torch.empty(k, dtype=torch.float32, device=w.device)
    for g in range(groups):
        block = w[:, g * gs:(g + 1) * gs].abs().float()
        out[g * gs:(g + 1) * gs] = (block / block.amax(dim=1, keepdim=True).clamp_min(1e-12)).mean(0)
    return out


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``mean|x|^α`` (or ``/ mean|ŵ|^(1-α)`` with ``w_mean``), normalised to ``sqrt(max·min) = 1``."""
    s = x_mean.clamp_min(MIN_STAT).pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + MIN_STAT)
    s = s.clamp_min(MIN_STAT)
    return s / (s.max() * s.min()).sqrt()


def _alphas(grid: int, duo: bool) -> list[float]:
    """The exponents tried besides ``s = 1`` (``α = 0`` without ``duo`` is ``s = 1`` itself)."""
    return [i / grid for i in range(grid) if i or duo]


def _best_scales(k: int, device, x_mean: torch.Tensor, w_mean: torch.Tensor | None, grid: int, duo: bool,
                 score: Callable[[torch.Tensor], tuple[float, list]]):
    """The search loop shared by both scorers: ``s = 1`` first, then each ``α``; ``score(s)`` gives
    ``(error, rounded)``. Returns ``(alpha, scales, error, rounded)`` of the best and ``(error, rounded)``
    of ``s = 1``."""
    ones = torch.ones(k, dtype=torch.float32, device=device)
    base = score(ones)
    best = (None, ones, *base)
    for alpha in _alphas(grid, duo):
        s = candidate_scales(x_mean.float(), w_mean, alpha)
        err, rounded = score(s)
        if err < best[2]:
            best = (alpha, s, err, rounded)
    return best, base


def search_scales(weights: list[torch.Tensor], x_mean: torch.Tensor, h: torch.Tensor, spec: QuantSpec,
                  grid: int = 20, duo: bool = True) -> ScaleSearch:
    """The per-input-channel scales of a group of linears sharing one input, scored by min-max
    round-to-nearest (see the module docstring).

    ``weights``: the group's ``[N_l, K]`` weights; ``x_mean [K]``: mean ``|x|`` per channel;
    ``h [K, K]``: ``2XᵀX/n`` of the same inputs.
    """
    w = torch.cat([x.float() for x in weights])
    w_mean = weight_channel_mean(w, spec) if duo else None
    (alpha, s, err, _), (base, _) = _best_scales(w.shape[1], w.device, x_mean, w_mean, grid, duo,
                                                 lambda s: (output_error(w, h, s, spec), []))
    return ScaleSearch(alpha=alpha, scales=s, error=err, base_error=base, reference=_trace(w, h))


Rounder = Callable[[torch.Tensor, torch.Tensor], QuantizedWeight]
"""``(scaled weight [N, K], Hessian of its inputs [K, K]) -> its rounding``, e.g. GPTQ."""


def _rounded_error(weights: list[torch.Tensor], h: torch.Tensor, s: torch.Tensor,
                   rounder: Rounder) -> tuple[float, list[QuantizedWeight]]:
    hs = scaled_hessian(h, s)
    rounded = [rounder(w * s, hs) for w in weights]
    err = sum(_trace(q.dequantize().to(w.device) / s - w, h) for q, w in zip(rounded, weights))
    return err, rounded


def search_scales_with(weights: list[torch.Tensor], x_mean: torch.Tensor, h: torch.Tensor, spec: QuantSpec,
                       rounder: Rounder, grid: int = 20, duo: bool = True) -> ScaleSearch:
    """:func:`search_scales` with every candidate scored by ``rounder`` applied to the scaled weights and
    the scaled Hessian; ``rounded`` holds the winner's rounding of each linear (in the scaled space), so
    the caller packs it as it is (``base_rounded``: with ``s = 1``). ``s = 1`` is a candidate, so the
    error is never above the rounder's own on the unscaled weights (``base_error``)."""
    weights = [w.float() for w in weights]
    w_mean = weight_channel_mean(torch.cat(weights), spec) if duo else None
    (alpha, s, err, rounded), (base, base_rounded) = _best_scales(
        weights[0].shape[1], weights[0].device, x_mean, w_mean, grid, duo,
        lambda s: _rounded_error(weights, h, s, rounder))
    return ScaleSearch(alpha=alpha, scales=s, error=err, base_error=base,
                       reference=sum(_trace(w, h) for w in weights), rounded=rounded, base_rounded=base_rounded)


def scaled_hessian(h: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``diag(s)⁻¹ H diag(s)⁻¹``: the Hessian of the inputs ``x / s`` the scaled weights read."""
    inv = 1.0 / scales
    return h * inv[:, None] * inv[None, :]


def clip_range(w: torch.Tensor, ratio: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(low, high) [N, 1]`` of ``w [N, C]`` shrunk by ``ratio [N, 1]`` (the range includes 0;
    symmetric grids shrink ``max |w|``)."""
    zeros = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
    low, high = torch.minimum(w.amin(1, keepdim=True), zeros), torch.maximum(w.amax(1, keepdim=True), zeros)
    if sym:
        high = torch.maximum(-low, high)
        low = -high
    return low * ratio, high * ratio


def _quantized(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale, zero = find_params(w, _minmax(spec))
    return dequantize(quantize(w, scale, zero, spec.maxq), scale, zero)


def search_clip(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec,
                grid: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clipped w [N, K], ratios [G, N])``: each (row, group) of ``w`` clamped to the shrunk range
    whose min-max quantization gives the least error ``dᵀ H_gg d`` of that group's partial output;
    ``h [K, K]`` is the Hessian of the inputs ``w`` reads. A ratio of 1 leaves the weights as they are."""
    n, k = w.shape
    gs, groups = spec.groups_for(k)
    w = w.float()
    out = w.clone()
    ratios = torch.ones(groups, n, dtype=torch.float32, device=w.device)
    steps = max(1, int(round(MAX_SHRINK * grid)))
    for g in range(groups):
        cols = slice(g * gs, min((g + 1) * gs, k))
        block, hg = w[:, cols], h[cols, cols]
        best_err = torch.full((n,), float("inf"), device=w.device)
        for i in range(steps):
            p = torch.full((n, 1), 1.0 - i / grid, device=w.device)
            low, high = clip_range(block, p, spec.sym)
            d = _quantized(torch.clamp(block, low, high), spec) - block
            err = ((d @ hg) * d).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            ratios[g] = torch.where(better, p[:, 0], ratios[g])
        low, high = clip_range(block, ratios[g][:, None], spec.sym)
        out[:, cols] = torch.clamp(block, low, high)
    return out, ratios


def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor,
                   offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm whose output ``(offset + w)·x̂ + b`` is divided by ``s``: ``w' = (offset + w)/s − offset``,
    ``b' = b/s`` (``offset`` 1 for Gemma's ``x̂·(1 + w)``)."""
    new_w = ((offset + weight.float()) / scales - offset).to(weight.dtype)
    return new_w, None if bias is None else (bias.float() / scales).to(bias.dtype)


def fold_into_rows(weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor,
                   start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear ``[N, K]`` whose output rows ``start .. start + len(s)`` (and bias) are divided by ``s``."""
    rows = slice(start, start + scales.numel())
    new_w = weight.clone()
    new_w[rows] = (weight[rows].float() / scales[:, None]).to(weight.dtype)
    if bias is None:
        return new_w, None
    new_b = bias.clone()
    new_b[rows] = (bias[rows].float() / scales).to(bias.dtype)
    return new_w, new_b


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``W·diag(s)`` for a weight ``[N, K]`` reading inputs divided by ``s``."""
    return (weight.float() * scales[None, :]).to(weight.dtype)
