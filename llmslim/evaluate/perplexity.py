"""Perplexity by the standard protocol.

The documents are joined with ``"\\n\\n"`` and tokenized once with the
tokenizer's defaults; the ids are cut into non-overlapping windows of
``seqlen`` tokens (the tail is dropped); perplexity is ``exp`` of the mean
next-token loss over all predicted positions of all windows. Every window
predicts ``seqlen - 1`` tokens, so this equals the mean of per-window losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmslim.data import join_documents
from llmslim.errors import UsageError
from llmslim.evaluate.validity import safe_exp

__all__ = ["tokenize_text", "eval_windows", "window_nll", "mean_nll", "perplexity"]


def tokenize_text(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents, joined with a blank line and tokenized once: a 1-D LongTensor."""
    text = join_documents(docs)
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    return ids[0].long()


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UsageError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def window_nll(model, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed next-token negative log-likelihood, predicted tokens) of windows ``batch`` [b, seqlen]."""
    logits = model(input_ids=batch, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                          reduction="sum")
    return nll, batch[:, 1:].numel()


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor, *, batch_size: int = 1, progress=None) -> float:
    """Mean next-token negative log-likelihood over ``windows`` ([n, seqlen]); nan or inf when
    the model's outputs are not finite."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    iterator = progress.track(batches, "perplexity", total=len(batches)) if progress else batches
    for start in iterator:
        nll, tokens = window_nll(model, windows[start : start + batch_size].to(device))
        total_nll += nll.item()
        total_tokens += tokens
    return total_nll / total_tokens


def perplexity(model, windows: torch.Tensor, *, batch_size: int = 1, progress=None) -> float:
    """exp(mean next-token negative log-likelihood) over ``windows``; inf when it overflows, nan
    when the loss is nan (see :mod:`llmslim.evaluate.validity`)."""
    return safe_exp(mean_nll(model, windows, batch_size=batch_size, progress=progress))
