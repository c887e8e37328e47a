"""Uniform integer quantization of weight matrices: grid parameters, codes,
and group-wise round-to-nearest (RTN).

Conventions (those of the GPTQ reference quantizer and the GPTQ checkpoint
format):

* a weight is ``scale * (code - zero)`` with ``code`` in ``[0, maxq]``,
  ``maxq = 2**bits - 1`` and an integer ``zero``;
* the quantization range of a row always contains 0;
* symmetric grids put ``zero`` at ``2**(bits-1)`` (8 for 4 bits), so the
  codes span ``-2**(bits-1) .. 2**(bits-1)-1`` steps around 0;
* asymmetric grids use ``zero = round(-xmin / scale)``, **kept at 1 or more**:
  the GPTQ v1 checkpoint format stores ``zero - 1``, and a zero of 0 cannot be
  written there without corrupting the neighbouring fields. A row whose
  minimum rounds to the code 0 therefore gets the grid ``[-1, maxq-1]·scale``
  with ``scale = xmax / (maxq - 1)``, so its maximum stays representable;
* an all-zero row gets the range ``[-1, 1]``, which still maps 0 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantSpec", "QuantizedWeight", "find_params", "group_params", "quantize", "dequantize",
           "rtn_quantize_weight"]

SCALE_SEARCHES = ("minmax", "mse")
MSE_GRID = 100         # candidate clipping ratios p = 1 - i / MSE_GRID
MSE_MAX_SHRINK = 0.2   # the smallest ratio tried is 1 - MSE_MAX_SHRINK
MSE_NORM = 2.0         # the error of a candidate is sum(|w - q(w)| ** MSE_NORM)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight matrix.

    ``group_size`` columns share one scale and zero per output row; -1 means
    one group spanning all columns (per output channel). ``scale_search`` is
    ``"minmax"`` (the full range) or ``"mse"`` (search a clipping ratio per
    group that minimises the quantization error).
    """

    bits: int
    group_size: int = 128
    sym: bool = True
    scale_search: str = "minmax"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise ValueError(f"group_size must be -1 or a positive integer, got {self.group_size!r}")
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search must be one of {SCALE_SEARCHES}, got {self.scale_search!r}")

    @property
    def maxq(self) -> int:
        """The largest code, ``2**bits - 1``."""
        return 2 ** self.bits - 1

    def groups_for(self, columns: int) -> tuple[int, int]:
        """``(group_size, n_groups)`` for a matrix with ``columns`` input columns.

        Groups are consecutive runs of ``group_size`` columns; when the group
        size does not divide ``columns`` the last group is partial (the
        standard GPTQ layout: ``g_idx[k] = k // group_size``, ``ceil(columns /
        group_size)`` groups). A group size of at least ``columns`` (and -1)
        gives one group of all the columns.
        """
        if columns < 1:
            raise ValueError(f"a weight needs at least one input column, got {columns}")
        gs = columns if self.group_size == -1 else min(self.group_size, columns)
        return gs, -(-columns // gs)


def grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool, rounding=torch.round):
    """Scale and zero ``[R]`` for ranges ``[xmin, xmax]`` (``xmin <= 0 <= xmax``); ``rounding`` rounds the
    zero point (learned rounding passes a straight-through one, to differentiate through the range)."""
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        return scale, torch.full_like(scale, float((maxq + 1) // 2))
    zero = rounding(-xmin / scale).clamp(0, maxq)
    low = zero < 1   # the v1 format cannot store a zero of 0: move the grid down one step
    scale = torch.where(low, xmax / (maxq - 1), scale)
    return scale, torch.where(low, torch.ones_like(zero), zero)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer-valued codes in ``[0, maxq]`` (same float dtype as ``w``).

    ``scale`` and ``zero`` broadcast against ``w`` (e.g. ``[N, 1]`` for ``[N, C]``).
    """
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Weights ``scale * (codes - zero)``."""
    return scale * (codes - zero)


def _mse_search(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool,
                importance: torch.Tensor | None = None):
    """Shrink each row's range by the ratio that minimises ``sum |w - q(w)|**MSE_NORM``,
    each column's error weighted by ``importance`` when given."""
    best_scale, best_zero = grid_from_range(xmin, xmax, maxq, sym)
    best_err = torch.full_like(xmin, float("inf"))
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1.0 - i / MSE_GRID
        scale, zero = grid_from_range(p * xmin, p * xmax, maxq, sym)
        s, z = scale.unsqueeze(1), zero.unsqueeze(1)
        err = (dequantize(quantize(w, s, z, maxq), s, z) - w).abs_().pow_(MSE_NORM)          # [R, C]
        err = (err if importance is None else err.mul_(importance)).sum(1)                   # [R]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def find_params(w: torch.Tensor, spec: QuantSpec,
                importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid of ``w [N, C]``: ``(scale [N, 1], zero [N, 1])`` in ``w``'s float dtype.

    ``zero`` is integer-valued. Each row's range includes 0; see the module
    docstring for the symmetric and asymmetric conventions. ``importance``
    (``[C]`` or ``[N, C]``, non-negative) weights each weight's error in the
    ``mse`` search: GPTQ passes the Hessian diagonal, so the clipping ratio
    minimises an estimate of the output error rather than the weight error.
    """
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"find_params expects a non-empty [rows, columns] matrix, got shape {tuple(w.shape)}")
    w = w if w.is_floating_point() else w.float()
    zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)   # [N]
    xmax = torch.maximum(w.max(dim=1).values, zeros)   # [N]
    if spec.scale_search == "mse":
        scale, zero = _mse_search(w, xmin, xmax, spec.maxq, spec.sym, importance)
    else:
        scale, zero = grid_from_range(xmin, xmax, spec.maxq, spec.sym)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def group_params(w: torch.Tensor, spec: QuantSpec,
                 importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids of the natural groups (consecutive ``group_size`` columns) of ``w [N, K]``:
    ``(scales [G, N], zeros [G, N])``; ``importance`` ``[K]`` as in :func:`find_params`.

    A partial last group (``K`` not a multiple of the group size) gets its own
    grid from its own columns, searched exactly like the full groups.
    """
    n, k = w.shape
    gs, groups = spec.groups_for(k)
    full = k // gs
    scales, zeros = [], []
    if full:
        imp = None if importance is None else \
            importance[:full * gs].reshape(1, full, gs).expand(n, -1, -1).reshape(n * full, gs)
        s, z = find_params(w[:, :full * gs].reshape(n * full, gs), spec, imp)       # [N*F, 1], rows (n, g)
        scales.append(s.reshape(n, full).t())
        zeros.append(z.reshape(n, full).t())
    if full < groups:                                                            # the partial last group
        s, z = find_params(w[:, full * gs:], spec, None if importance is None else importance[full * gs:])
        scales.append(s.t())
        zeros.append(z.t())
    return torch.cat(scales).contiguous(), torch.cat(zeros).contiguous()


@dataclass
class QuantizedWeight:
    """A quantized ``[N, K]`` weight (``N`` outputs, ``K`` inputs).

    ``W[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])``.

    * ``codes``: ``[N, K]`` uint8, values ``0..maxq``;
    * ``scales``: ``[G, N]`` float32;
    * ``zeros``: ``[G, N]`` int32, the raw zero points (not the v1 ``zero - 1``);
    * ``g_idx``: ``[K]`` int32, the group of each input column.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)``."""
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The weight ``[N, K]`` in float32, on the device of ``codes``."""
        g = self.g_idx.long().to(self.codes.device)                   # [K]
        scale = self.scales.float().to(self.codes.device)[g].t()      # [N, K]
        zero = self.zeros.to(self.codes.device)[g].t().float()         # [N, K]
        return dequantize(self.codes.float(), scale, zero)


def rtn_quantize_weight(W: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Group-wise round-to-nearest quantization of ``W [N, K]``.

    Groups are consecutive runs of ``spec.group_size`` columns (``g_idx[k] =
    k // group_size``), the last one partial when the group size does not
    divide ``K``; -1 gives one group.
    """
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(W.shape)}")
    n, k = W.shape
    gs, _ = spec.groups_for(k)
    w = W.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("the weight contains NaN or infinite values")
    scales, zeros = group_params(w, spec)                      # [G, N]
    g_idx = torch.arange(k, device=w.device) // gs             # [K]
    codes = quantize(w, scales[g_idx].t(), zeros[g_idx].t(), spec.maxq)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        spec=spec,
    )
