"""Importance of heads, MLP channels and layers, and the selections made
from them. Pure functions on tensors; weights are in ``nn.Linear`` layout
[out_features, in_features].

* activation (Minitron-style, forward only, made output-aware): a structure's
  score is the root-mean-square norm, over the calibration tokens, of what it
  adds to the residual stream. A head adds ``W_o[:, h] a_h``, whose squared
  norm summed over tokens is ``trace(W_hᵀ W_h G_h)`` with ``G_h = Σ a_hᵀ a_h``
  (the per-head Gram matrix of o_proj's input); an MLP channel adds
  ``W_down[:, j] a_j``: ``||W_down[:, j]|| · rms(a_j)``. Minitron's
  criterion (the activation alone) ignores the output projection's weights.
* magnitude: the L2 norm of the weights that belong to the structure.
* taylor: sum over the structure's weights of |w * dL/dw| (first-order
  estimate of the loss change when they are zeroed).
* layers: block influence 1 - E[cos(x_in, x_out)] over tokens; the layers
  that change their input least are removed first.

A head's structure is its rows of q, its columns of o and a 1/g share of its
key/value group's rows of k and v; a channel's is its rows of the MLP's input
linears and its column of the output linear.
"""

from __future__ import annotations

import torch

__all__ = ["head_sq_sums", "channel_abs_sums", "head_grams", "channel_sq_sums", "head_output_scores",
           "channel_output_scores", "cosine_sums", "per_head_sum", "per_channel_sum",
           "magnitude_head_scores", "magnitude_channel_scores", "taylor_head_scores", "taylor_channel_scores",
           "select_heads", "select_channels", "layers_to_drop"]


def head_sq_sums(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head sums of squares of an attention output ``x`` [..., heads * head_dim], in float64."""
    x = x.reshape(-1, heads, x.shape[-1] // heads).double()
    return x.square().sum(dim=(0, 2))


def channel_abs_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sums of |x| over every token of ``x`` [..., channels], in float64."""
    return x.reshape(-1, x.shape[-1]).double().abs().sum(dim=0)


def head_grams(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head Gram matrices ``Σ_tokens a_hᵀ a_h`` [heads, d, d] of an attention output ``x``, in float64."""
    x = x.reshape(-1, heads, x.shape[-1] // heads).double()
    return torch.einsum("thi,thj->hij", x, x)


def channel_sq_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sums of squares over every token of ``x`` [..., channels], in float64."""
    return x.reshape(-1, x.shape[-1]).double().square().sum(dim=0)


def head_output_scores(grams: torch.Tensor, o_weight: torch.Tensor, tokens: int) -> torch.Tensor:
    """RMS over tokens of each head's contribution ``W_o[:, h] a_h`` to the output (``o_weight``
    [hidden, heads * d])."""
    heads, d, _ = grams.shape
    w = o_weight.double().reshape(o_weight.shape[0], heads, d)
    gram_w = torch.einsum("khi,khj->hij", w, w)                          # W_hᵀ W_h
    return ((gram_w * grams).sum(dim=(1, 2)).clamp_min(0) / tokens).sqrt()


def channel_output_scores(sq_sums: torch.Tensor, down_weight: torch.Tensor, tokens: int) -> torch.Tensor:
    """RMS over tokens of each channel's contribution ``W_down[:, j] a_j`` (``down_weight`` [hidden, channels])."""
    return (sq_sums / tokens).sqrt() * down_weight.double().norm(dim=0)


def cosine_sums(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of cos(x_in, x_out), tokens) for hidden states [..., hidden]."""
    a, b = x_in.reshape(-1, x_in.shape[-1]).double(), x_out.reshape(-1, x_out.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return cos.sum().item(), cos.numel()


def per_head_sum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, heads: int,
                 kv_heads: int) -> torch.Tensor:
    """Sum an element-wise saliency (same shapes as the weights) over each head's structure."""
    group = heads // kv_heads
    head_dim = q.shape[0] // heads
    own = q.reshape(heads, head_dim, -1).sum(dim=(1, 2)) + o.reshape(o.shape[0], heads, head_dim).sum(dim=(0, 2))
    shared = (k.reshape(kv_heads, -1).sum(dim=1) + v.reshape(kv_heads, -1).sum(dim=1)) / group
    return own + shared.repeat_interleave(group)


def per_channel_sum(inputs: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """Sum an element-wise saliency over each intermediate channel's rows and column."""
    return sum(w.sum(dim=1) for w in inputs) + output.sum(dim=0)


def magnitude_head_scores(q, k, v, o, heads: int, kv_heads: int) -> torch.Tensor:
    sq = [w.double().square() for w in (q, k, v, o)]
    return per_head_sum(*sq, heads, kv_heads).sqrt()


def magnitude_channel_scores(inputs: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return per_channel_sum([w.double().square() for w in inputs], output.double().square()).sqrt()


def _taylor(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (w.double() * g.double()).abs()


def taylor_head_scores(weights, grads, heads: int, kv_heads: int) -> torch.Tensor:
    """``weights`` and ``grads``: (q, k, v, o) each."""
    return per_head_sum(*(_taylor(w, g) for w, g in zip(weights, grads)), heads, kv_heads)


def taylor_channel_scores(weights_in, grads_in, weight_out, grad_out) -> torch.Tensor:
    return per_channel_sum([_taylor(w, g) for w, g in zip(weights_in, grads_in)], _taylor(weight_out, grad_out))


def _top(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Indices of the ``k`` largest along ``dim`` (the earlier index wins a tie)."""
    order = torch.argsort(scores, dim=dim, descending=True, stable=True)
    return order.narrow(dim, 0, k)


def select_heads(scores: torch.Tensor, kv_heads: int, groups: int, per_group: int) -> torch.Tensor:
    """Kept query heads, ascending: in each key/value group the ``per_group`` best heads, and of the
    groups the ``groups`` whose kept heads score highest in total."""
    heads = scores.numel()
    size = heads // kv_heads
    table = scores.reshape(kv_heads, size)
    best = _top(table, per_group, dim=1)  # [kv_heads, per_group]
    group_scores = table.gather(1, best).sum(dim=1)
    kept_groups = _top(group_scores, groups).sort().values
    kept = best[kept_groups].sort(dim=1).values + kept_groups[:, None] * size
    return kept.flatten()


def select_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` best channels, ascending."""
    return _top(scores, keep).sort().values


def layers_to_drop(influence: list[float], count: int) -> list[int]:
    """The ``count`` layers of lowest block influence, ascending."""
    if count <= 0:
        return []
    return sorted(_top(-torch.tensor(influence, dtype=torch.float64), count).tolist())
