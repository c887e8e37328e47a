"""GPTQ (Frantar et al., 2022): quantize a linear layer's weight column by
column, spreading each column's rounding error over the columns not yet
quantized through the inverse Hessian of the layer's reconstruction loss.

``H = 2 XᵀX / n`` is accumulated in fp32 from the layer's calibration inputs
(:func:`accumulate_hessian`); :func:`gptq_quantize_weight` then follows the
IST-DASLab reference algorithm (dead columns, optional act-order, relative
dampening, upper Cholesky factor of the inverse, lazy block updates) with two
deliberate differences:

* group parameters come from the *current* weights of the group, including
  the updates made earlier in the same block (the reference reads stale
  weights when a group starts inside a block);
* a failed Cholesky factorisation raises the dampening and retries; the
  fraction finally used is reported in :class:`GPTQStats`.

All math runs in fp32 on the device of ``W``. On CUDA the matmuls follow
torch's global TF32 setting, which is off by default; this module never
changes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from llmslim.quant.quantizer import (QuantizedWeight, QuantSpec, dequantize, find_params, group_params,
                                     quantize)

__all__ = ["GPTQStats", "make_empty_hessian", "accumulate_hessian", "gptq_quantize_weight"]

DAMP_GROWTH = 2.0       # each retry multiplies the dampening fraction by this
DAMP_RETRY_START = 0.01  # first retry value when the requested dampening is 0
DAMP_MAX = 10.0          # give up past this fraction of the mean Hessian diagonal


@dataclass
class GPTQStats:
    """What happened while quantizing one weight."""

    damp_used: float      # dampening finally used, as a fraction of mean(diag H)
    damp_retries: int     # Cholesky failures before it succeeded
    loss: float           # sum of the GPTQ proxy loss (w - q)² / (2 [H⁻¹]ᵢᵢ)
    dead_columns: int     # input columns with a zero Hessian diagonal (weights zeroed)
    rounded: torch.Tensor | None = None   # keep_rounded: each weight as GPTQ's update left it just before
                                          # it was rounded, [N, K] in natural column order


def make_empty_hessian(K: int, device=None) -> torch.Tensor:
    """A zero ``[K, K]`` float32 Hessian accumulator."""
    if K < 1:
        raise ValueError(f"the Hessian needs at least one input feature, got K={K}")
    return torch.zeros(K, K, dtype=torch.float32, device=device)


def accumulate_hessian(H: torch.Tensor, nsamples: int, x: torch.Tensor,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Fold inputs ``x [..., K]`` into the running average ``H = 2 XᵀX / n``.

    ``n`` counts tokens (rows of ``x`` after flattening the leading dims).
    ``mask`` (shape ``x.shape[:-1]``, true for valid tokens) drops padding.
    ``H`` is updated in place and returned with the new count.
    """
    k = H.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the Hessian is {k}x{k}")
    rows = x.detach().reshape(-1, k)                                    # [T, K]
    if mask is not None:
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the inputs' {tuple(x.shape[:-1])}")
        rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
    tokens = rows.shape[0]
    if tokens == 0:
        return H, nsamples
    total = nsamples + tokens
    rows = rows.to(device=H.device, dtype=torch.float32) * math.sqrt(2.0 / total)
    H.mul_(nsamples / total)
    H.addmm_(rows.t(), rows)                                            # += 2/total · XᵀX
    return H, total


def working_hessian(H: torch.Tensor, device: torch.device, perm: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 copy of ``H`` on ``device`` (in the order ``perm`` when given) whose zero diagonal entries
    (dead columns) are 1: what the factorisation works on, and may overwrite."""
    H = H.detach().to(device=device, dtype=torch.float32)
    out = H.clone() if perm is None else H[perm][:, perm]
    diag = out.diagonal()
    diag[diag == 0] = 1.0
    return out


def _inverse_cholesky(make_h: Callable[[], torch.Tensor], damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, ``H`` from ``make_h()``
    (a fresh working copy, see :func:`working_hessian`, owned and overwritten here).

    Raises ``damp`` geometrically until both factorisations succeed. At most three ``[K, K]`` matrices
    are alive at once beside the caller's Hessian: the damped copy is factorised in place (no identity,
    no sum), and it and each intermediate factor are dropped as soon as the next one exists. A rare
    failure of the second factorisation asks ``make_h`` for a new copy.
    Returns ``(U [K, K], damp_used, retries)``.
    """
    H, added = make_h(), 0.0
    base = H.diagonal().abs().mean().item()
    base = base if base > 0 and math.isfinite(base) else 1.0
    current, retries = damp, 0
    while current <= DAMP_MAX:
        if H is None:
            H, added = make_h(), 0.0
        H.diagonal().add_(current * base - added)
        added = current * base
        lower, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            H = None
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, current, retries
        retries += 1
        current = current * DAMP_GROWTH if current > 0 else DAMP_RETRY_START
    raise ValueError(f"the Hessian is not positive definite even with dampening {DAMP_MAX:g} x mean(diag) "
                     f"after {retries} attempts (started at {damp:g})")


def _effective_block(block_size: int, gs: int, columns: int) -> int:
    """A block size that keeps each dynamic group inside one block, or starting one.

    Either a multiple of ``gs`` (no larger than ``block_size``) or a divisor of ``gs``.
    """
    if gs >= columns:
        return block_size
    if gs <= block_size:
        return (block_size // gs) * gs
    return max(d for d in range(1, block_size + 1) if gs % d == 0)


def _check_inputs(W: torch.Tensor, H: torch.Tensor, block_size: int, damp: float) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(W.shape)}")
    k = W.shape[1]
    if tuple(H.shape) != (k, k):
        raise ValueError(f"the Hessian has shape {tuple(H.shape)}, expected ({k}, {k}) for {k} input columns")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not 0 <= damp < DAMP_MAX:
        raise ValueError(f"damp must be in [0, {DAMP_MAX:g}), got {damp}")
    if not torch.isfinite(W).all():
        raise ValueError("the weight contains NaN or infinite values")
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian contains NaN or infinite values (did the calibration overflow?)")
    if bool((H.diagonal() < 0).any()):
        raise ValueError("the Hessian has negative diagonal entries; expected 2·XᵀX/n from the layer's inputs")


def _quantize_blocks(W: torch.Tensor, Hinv: torch.Tensor, spec: QuantSpec, gs: int, block: int,
                     scales: torch.Tensor, zeros: torch.Tensor, col_group: list[int],
                     dynamic: torch.Tensor | None, pruned: torch.Tensor | None = None,
                     rounded: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The lazy-batch GPTQ loop over the columns of ``W [N, K]`` (in place).

    ``col_group[j]`` is the row of ``scales``/``zeros`` (``[G, N]``) used by
    column ``j``; with ``dynamic`` (the Hessian diagonal in quantization order)
    those rows are filled here, from the current weights, when a group starts.
    ``pruned`` ``[N, K]`` (quantization order) marks weights that must stay exactly 0: they get
    the code of their zero point (which dequantizes to exactly 0, symmetric or not), are left out
    of the group grids, and their error is spread like any other. ``rounded`` ``[N, K]``, when
    given, receives each column's weights just before they are rounded.
    Returns ``(codes [N, K] uint8, loss)``.
    """
    n, k = W.shape
    codes = torch.empty(n, k, dtype=torch.uint8, device=W.device)       # [N, K]
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()                                        # [N, B] working copy
        Err1 = torch.empty_like(W1)                                     # [N, B]
        Hinv1 = Hinv[i1:i2, i1:i2]                                      # [B, B]
        for i in range(count):
            j = i1 + i
            if dynamic is not None and j % gs == 0:
                # the group (the last one may be partial) lies inside this block, or starts
                # it (see _effective_block): read its current weights from the working copy
                end = min(j + gs, k)
                current = W1[:, i:end - i1] if end <= i2 else W[:, j:end]
                if pruned is not None:
                    current = current.masked_fill(pruned[:, j:end], 0.0)
                s, z = find_params(current, spec, dynamic[j:end])
                scales[j // gs], zeros[j // gs] = s[:, 0], z[:, 0]
            s, z = scales[col_group[j]], zeros[col_group[j]]            # [N]
            w, d = W1[:, i], Hinv1[i, i]
            if rounded is not None:
                rounded[:, j] = w
            q = quantize(w, s, z, spec.maxq)
            if pruned is not None:
                q = torch.where(pruned[:, j], z, q)                     # code z: exactly 0
            codes[:, j] = q.to(torch.uint8)
            diff = w - dequantize(q, s, z)                              # [N]
            loss += diff.square().sum() / (2 * d * d)
            err = diff / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, loss.item()


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                         damp: float = 0.01, act_order: bool = False,
                         static_groups: bool = False, pruned: torch.Tensor | None = None,
                         keep_rounded: bool = False) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantize ``W [N, K]`` with GPTQ, given the Hessian ``H [K, K]`` of its inputs.

    * ``act_order`` quantizes columns by decreasing ``diag(H)``. Without
      ``static_groups`` its groups are consecutive in that order, so ``g_idx``
      is a non-monotonic map from input column to group (each group has
      ``group_size`` members, the last one fewer when the group size does not
      divide ``K``).
    * ``static_groups`` computes every group's grid up front from the original
      ``W`` in natural column order, so ``g_idx[k] = k // group_size`` even
      with ``act_order``; a partial last group is the tail of the natural order.
    * ``damp`` is the dampening fraction of ``mean(diag H)`` added to the
      diagonal; it is raised automatically when the factorisation fails.
    * ``pruned`` (bool ``[N, K]``, e.g. a ``sparsify`` step's zeros) marks
      weights that stay exactly 0 after quantization; GPTQ does not fill them in.
    * ``keep_rounded`` returns in the stats the weights GPTQ's updates led to, just before each was
      rounded (``codes`` are their round-to-nearest on the grid): where learned rounding starts.

    ``W`` and ``H`` are not modified. Everything is computed in fp32 on ``W``'s device.
    """
    _check_inputs(W, H, block_size, damp)
    n, k = W.shape
    gs, groups = spec.groups_for(k)
    W = W.detach().to(torch.float32).clone()
    diag = H.diagonal().to(device=W.device, dtype=torch.float32).clone()   # [K]
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    if pruned is not None:
        if tuple(pruned.shape) != (n, k):
            raise ValueError(f"the pruned mask has shape {tuple(pruned.shape)}, expected ({n}, {k})")
        pruned = pruned.to(device=W.device, dtype=torch.bool)
        W = W.masked_fill(pruned, 0.0)
    per_channel = groups == 1
    static = static_groups and not per_channel
    if static:
        scales, zeros = group_params(W, spec, diag)                    # [G, N]
    else:
        scales = torch.zeros(groups, n, dtype=torch.float32, device=W.device)
        zeros = torch.zeros_like(scales)
    natural = torch.arange(k, device=W.device)
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else natural
    if act_order:
        W, diag = W[:, perm], diag[perm]
        pruned = pruned[:, perm] if pruned is not None else None
    if per_channel:
        s, z = find_params(W, spec, diag)
        scales[0], zeros[0] = s[:, 0], z[:, 0]
    # diag is in quantization order from here; the caller's H is read, never copied whole more than
    # once at a time (large inputs: 4 K² bytes each)
    Hinv, damp_used, retries = _inverse_cholesky(
        lambda: working_hessian(H, W.device, perm if act_order else None), damp)
    # the group of each column in quantization order: natural groups of the original
    # columns when static, consecutive runs of the (permuted) order when dynamic
    col_group = torch.zeros_like(natural) if per_channel else (perm if static else natural) // gs   # [K]
    block = _effective_block(block_size, gs, k)
    rounded = torch.empty_like(W) if keep_rounded else None
    codes, loss = _quantize_blocks(W, Hinv, spec, gs, block, scales, zeros, col_group.tolist(),
                                   dynamic=diag if not static and not per_channel else None, pruned=pruned,
                                   rounded=rounded)
    g_idx = torch.empty_like(col_group)
    g_idx[perm] = col_group                                             # back to natural column order
    natural_codes = torch.empty_like(codes)
    natural_codes[:, perm] = codes
    if rounded is not None:
        rounded[:, perm] = rounded.clone()
    qw = QuantizedWeight(codes=natural_codes, scales=scales.contiguous(),
                         zeros=zeros.round().to(torch.int32), g_idx=g_idx.to(torch.int32), spec=spec)
    return qw, GPTQStats(damp_used=float(damp_used), damp_retries=retries, loss=loss,
                         dead_columns=int(dead.sum().item()), rounded=rounded)
