"""Budgets: hard limits on the result, checked after evaluation."""

from __future__ import annotations

from collections.abc import Callable

from llmslim.recipe.schema import BudgetsConfig
from llmslim.report import BudgetResult, Metrics

__all__ = ["check_budgets"]

MB = 1_000_000


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b - 1.0


# name -> (actual value from (baseline, result), "max" or "min")
_RULES: dict[str, tuple[Callable[[Metrics, Metrics], float | None], str]] = {
    "max_perplexity_increase": (lambda b, r: _ratio(r.perplexity, b.perplexity), "max"),
    "max_perplexity": (lambda b, r: r.perplexity, "max"),
    "max_size_mb": (lambda b, r: r.size_bytes / MB, "max"),
    "min_size_reduction": (lambda b, r: -_ratio(r.size_bytes, b.size_bytes), "min"),
    "max_peak_memory_mb": (lambda b, r: None if r.peak_memory_bytes is None else r.peak_memory_bytes / MB, "max"),
    "min_decode_tokens_per_s": (lambda b, r: r.decode_tokens_per_s, "min"),
    "max_energy_j_per_token": (lambda b, r: r.energy_j_per_token, "max"),
}


def check_budgets(budgets: BudgetsConfig, baseline: Metrics, result: Metrics) -> list[BudgetResult]:
    """One entry per budget set in the recipe; an unmeasured value fails its budget."""
    out = []
    for name, limit in budgets.model_dump().items():
        if limit is None:
            continue
        actual_fn, kind = _RULES[name]
        actual = actual_fn(baseline, result)
        if actual is None:
            note = "not measured"
            if name == "max_energy_j_per_token" and result.energy_unavailable_reason:
                note += f": {result.energy_unavailable_reason}"
            out.append(BudgetResult(name=name, limit=limit, actual=None, passed=False, note=note))
            continue
        passed = actual <= limit if kind == "max" else actual >= limit
        out.append(BudgetResult(name=name, limit=limit, actual=actual, passed=passed))
    return out
