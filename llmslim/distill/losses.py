"""Distillation losses: pure functions of logits (and hidden states).

Shapes: logits ``[..., vocab]``; ``mask`` has the leading shape (``[...]``)
and is 1/True where a position holds a real token, 0/False on padding. Every
loss is a mean over the unmasked positions, computed in float32 whatever the
inputs' dtype.

* :func:`forward_kl` ``T^2 * KL(teacher_T || student_T)`` where ``x_T`` is
  ``softmax(logits / T)``: the student covers every mode of the teacher.
  Multiplying by ``T^2`` keeps the gradient's size independent of ``T``.
* :func:`reverse_kl` ``T^2 * KL(student_T || teacher_T)``: mode seeking.
* :func:`next_token_ce` the plain language-model loss on the data (no teacher).
* :func:`hidden_cosine` ``1 - cos`` between student and teacher hidden states.
* :func:`distillation_loss` a weighted mix of the above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["masked_mean", "forward_kl", "reverse_kl", "next_token_ce", "hidden_cosine", "distillation_loss",
           "LOGIT_TERMS"]

LOGIT_TERMS = ("kl", "reverse_kl")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (all when None)."""
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; "
                         "the two models must share the tokenizer and vocabulary")


def _softened_kl(log_p: torch.Tensor, log_q: torch.Tensor, temperature: float,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """``T^2 * KL(p || q)`` per position from log-probabilities, masked mean over positions."""
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature ** 2 * masked_mean(per_position, mask)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` on temperature-softened distributions."""
    _check_pair(student_logits, teacher_logits)
    return _softened_kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature),
                        temperature, mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(p_student || p_teacher)`` on temperature-softened distributions."""
    _check_pair(student_logits, teacher_logits)
    return _softened_kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature),
                        temperature, mask)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of position ``t``'s logits against token ``t + 1`` (``logits`` ``[B, S, V]``,
    ``input_ids`` ``[B, S]``). A prediction counts when both positions are real tokens."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    per_position = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                   reduction="none").view(target.shape)
    valid = None if mask is None else mask[:, :-1].bool() & mask[:, 1:].bool()
    return masked_mean(per_position, valid)


def hidden_cosine(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of ``1 - cos(student, teacher)`` per position (states ``[B, S, H]``)."""
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError("hidden_cosine needs the same, non-zero number of student and teacher states")
    losses = []
    for s, t in zip(student_states, teacher_states):
        if s.shape != t.shape:
            raise ValueError(f"hidden states {tuple(s.shape)} and {tuple(t.shape)} differ in shape")
        cos = F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-6)
        losses.append(masked_mean(1.0 - cos, mask))
    return torch.stack(losses).mean()


def distillation_loss(weights: dict[str, float], student_logits: torch.Tensor, input_ids: torch.Tensor, *,
                      teacher_logits: torch.Tensor | None = None, temperature: float = 1.0,
                      mask: torch.Tensor | None = None, hidden_weight: float = 0.0,
                      student_states: Sequence[torch.Tensor] = (), teacher_states: Sequence[torch.Tensor] = (),
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """``sum(weight * term)`` over ``weights`` (``kl``, ``reverse_kl``, ``ce``) plus
    ``hidden_weight * hidden_cosine``. Returns the total and each term's value."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    for name, weight in weights.items():
        if name == "ce":
            term = next_token_ce(student_logits, input_ids, mask)
        elif name in LOGIT_TERMS:
            if teacher_logits is None:
                raise ValueError(f"loss term {name!r} needs the teacher's logits")
            fn = forward_kl if name == "kl" else reverse_kl
            term = fn(student_logits, teacher_logits, temperature, mask)
        else:
            raise ValueError(f"unknown loss term {name!r}")
        total = total + weight * term
        parts[name] = float(term.detach())
    if hidden_weight > 0:
        term = hidden_cosine(student_states, teacher_states, mask)
        total = total + hidden_weight * term
        parts["hidden_cosine"] = float(term.detach())
    return total, parts
