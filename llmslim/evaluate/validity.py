"""Honest numbers: a measured value that is not a finite number is never
reported as one. It becomes null, and ``Metrics.invalid`` says why."""

from __future__ import annotations

import math

__all__ = ["LATENCY_KEYS", "split_finite", "perplexity_reason", "rate_reason", "safe_exp"]

# Metrics fields that one latency measurement writes (and a re-measurement replaces).
LATENCY_KEYS = (
    "prefill_tokens_per_s",
    "prefill_tokens_per_s_p90",
    "prefill_tokens_per_s_spread",
    "decode_tokens_per_s",
    "decode_tokens_per_s_p90",
    "decode_tokens_per_s_spread",
    "energy_j_per_token",
)

_EXP_MAX = math.log(1.7e308)  # exp of more than this overflows a float64


def safe_exp(x: float) -> float:
    """``math.exp`` that returns inf instead of raising OverflowError (nan stays nan)."""
    return math.inf if x > _EXP_MAX else math.exp(x)


def _is_bad(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def split_finite(values: dict, reasons: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
    """``values`` with every non-finite float replaced by None, and {name: reason} for those.

    ``reasons`` gives a specific reason per name; otherwise the reason is generic.
    """
    reasons = reasons or {}
    clean, invalid = dict(values), {}
    for name, value in values.items():
        if _is_bad(value):
            clean[name] = None
            invalid[name] = reasons.get(name) or f"{name} is {value}: not a finite number"
    return clean, invalid


def perplexity_reason(mean_loss: float) -> str | None:
    """Why exp(``mean_loss``) is not a usable perplexity, or None when it is."""
    if math.isnan(mean_loss):
        return "perplexity is nan: the mean next-token loss is nan (the model's logits are not finite)"
    if math.isinf(mean_loss):
        return "perplexity is inf: the mean next-token loss is inf (a target token got probability 0)"
    if mean_loss > _EXP_MAX:
        return f"perplexity is inf: exp of the mean next-token loss {mean_loss:.6g} overflows a float"
    return None


def rate_reason(name: str, value: float) -> str:
    """Why a tokens/s figure (or its spread) is not finite: a phase timed at 0 s."""
    return f"{name} is {value}: the timed phase took 0 s at the clock's resolution"
