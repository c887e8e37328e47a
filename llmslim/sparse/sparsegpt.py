"""SparseGPT (Frantar & Alistarh, 2023): remove weights column by column and
update the columns not yet visited through the inverse Hessian of the layer's
reconstruction loss, so the layer output changes as little as possible
(optimal brain surgeon, one column at a time, with lazy block updates).

The Hessian ``H = 2 XᵀX / n`` is GPTQ's (:func:`llmslim.quant.accumulate_hessian`)
and so is its damped inverse Cholesky factor. A weight's removal cost is
``w² / [H⁻¹]ᵢᵢ²`` (the upper factor's diagonal); unstructured masks are
chosen per block of columns and per row (each row loses
``round(sparsity * K)`` weights in all), N:M masks per group of ``M`` columns
when the group starts, from the weights as updated so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmslim.quant.gptq import _inverse_cholesky, working_hessian
from llmslim.sparse.masks import nm_mask, row_counts, unstructured_mask

__all__ = ["SparseGPTStats", "sparsegpt_prune"]


@dataclass
class SparseGPTStats:
    damp_used: float
    damp_retries: int
    dead_columns: int


def _block_mask(W1: torch.Tensor, d: torch.Tensor, count: int, forced: torch.Tensor | None) -> torch.Tensor:
    return unstructured_mask(W1.square() / d.square().unsqueeze(0), count, forced)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, *, sparsity: float | None = None,
                    pattern: tuple[int, int] | None = None, forced: torch.Tensor | None = None,
                    block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, SparseGPTStats]:
    """Prune ``W [N, K]`` given ``H [K, K]``: ``sparsity`` (fraction removed per row) or ``pattern`` ``(n, m)``.

    ``forced`` ``[N, K]`` marks weights that must end at 0 (an earlier round's). Returns the updated
    weight (fp32, exact zeros where removed), the mask (true = removed) and the statistics; ``W`` and
    ``H`` are not modified.
    """
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity and pattern")
    n_rows, k = W.shape
    if tuple(H.shape) != (k, k):
        raise ValueError(f"the Hessian has shape {tuple(H.shape)}, expected ({k}, {k})")
    if pattern is not None and k % pattern[1]:
        raise ValueError(f"{k} input columns are not a multiple of M = {pattern[1]} for the "
                         f"{pattern[0]}:{pattern[1]} pattern")
    W = W.detach().to(torch.float32).clone()
    dead = H.diagonal().to(W.device) == 0
    W[:, dead] = 0.0
    Hinv, damp_used, retries = _inverse_cholesky(lambda: working_hessian(H, W.device), damp)
    block = block_size if pattern is None else max(pattern[1], (block_size // pattern[1]) * pattern[1])
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = Hinv1.diagonal()
        f1 = forced[:, i1:i2] if forced is not None else None
        M1 = _block_mask(W1, d, row_counts(k, sparsity, i1, i2), f1) if pattern is None \
            else torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                cols = slice(i, i + pattern[1])
                M1[:, cols] = nm_mask(W1[:, cols].square() / d[cols].square().unsqueeze(0), *pattern,
                                      None if f1 is None else f1[:, cols])
            w = W1[:, i]
            q = torch.where(M1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = M1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[mask] = 0.0
    return W, mask, SparseGPTStats(damp_used=float(damp_used), damp_retries=retries,
                                   dead_columns=int(dead.sum().item()))
