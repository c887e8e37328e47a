"""Importance scores and pruning masks of one weight ``W [N, K]`` (``N``
outputs, ``K`` inputs). A mask is a bool tensor of ``W``'s shape, true where
the weight is removed (set to exactly 0).

* Every method compares scores **within each output row**: each row loses
  the same number of weights, ``round(sparsity * K)``.
* ``N:M`` keeps at most ``N`` nonzero weights in every run of ``M``
  consecutive input columns of a row (NVIDIA's 2:4 sparse tensor cores);
  ``K`` must be a multiple of ``M``.
* ``forced`` (true where a weight must be removed whatever its score, e.g.
  weights an earlier round already removed) is taken first; a row that
  already has more forced zeros than its count keeps them all.
"""

from __future__ import annotations

import torch

__all__ = ["SPARSITY_MARKER", "wanda_scores", "magnitude_scores", "taylor_scores",
           "unstructured_mask", "nm_mask", "row_counts"]

SPARSITY_MARKER = "llmslim_sparsity"
"""The model-config attribute the ``sparsify`` step writes (method, pattern, measured sparsity): later
steps (``gptq``, ``distill``) read it to keep the zeros."""


def wanda_scores(weight: torch.Tensor, input_sq_sums: torch.Tensor) -> torch.Tensor:
    """Wanda: ``|W_ij| * ||x_j||_2``, with ``input_sq_sums[j]`` the sum over calibration tokens of ``x_j^2``."""
    return weight.abs().float() * input_sq_sums.float().clamp_min(0).sqrt().unsqueeze(0)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().float()


def taylor_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor influence ``|W * dL/dW|``: the loss change of removing each weight, to first order."""
    return (weight.float() * grad.float()).abs()


def row_counts(columns: int, sparsity: float, start: int = 0, end: int | None = None) -> int:
    """Weights removed per row among columns ``[start, end)``, chosen so that the counts of consecutive
    ranges add up to exactly ``round(sparsity * columns)`` over the whole row."""
    end = columns if end is None else end
    return round(sparsity * end) - round(sparsity * start)


def _with_forced(scores: torch.Tensor, forced: torch.Tensor | None) -> torch.Tensor:
    if forced is None:
        return scores
    return torch.where(forced, torch.full_like(scores, -1.0), scores)   # scores are >= 0: forced come first


def unstructured_mask(scores: torch.Tensor, count: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """The ``count`` lowest-scoring weights of every row (plus any ``forced`` beyond them)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        idx = torch.topk(_with_forced(scores, forced), count, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask if forced is None else mask | forced


def nm_mask(scores: torch.Tensor, n: int, m: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Remove the ``m - n`` lowest-scoring weights of every group of ``m`` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of M = {m} for the {n}:{m} pattern")
    grouped = _with_forced(scores, forced).reshape(rows, cols // m, m)
    idx = torch.topk(grouped, m - n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    return mask if forced is None else mask | forced
