"""The search's arithmetic, as pure functions: relative measurements, the score
``P^e * (alpha * T + beta * E)`` (Wallace et al., ICPE 2025) and the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence

from llmslim.recipe.schema import ObjectiveConfig
from llmslim.report import Metrics
from llmslim.search.records import Relative

__all__ = ["seconds_per_token", "relative", "score", "pareto_flags", "objective_note"]


def seconds_per_token(metrics: Metrics, which: str) -> float | None:
    """decode or prefill: 1 / tokens per second; total: the seconds of one latency run
    (prompt at prefill speed, then the new tokens at decode speed) per token."""
    pre, dec = metrics.prefill_tokens_per_s, metrics.decode_tokens_per_s
    if which == "prefill":
        return 1.0 / pre if pre else None
    if which == "decode":
        return 1.0 / dec if dec else None
    settings = metrics.latency_settings
    if not pre or not dec or settings is None:
        return None
    tokens = settings.prompt_tokens + settings.new_tokens
    return (settings.prompt_tokens / pre + settings.new_tokens / dec) / tokens


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def relative(result: Metrics, baseline: Metrics, timed_baseline: Metrics, time: str) -> Relative:
    """The result over the original: perplexity against the search's baseline; time and energy against
    the original as timed beside this result (``timed_baseline``)."""
    return Relative(perplexity=_ratio(result.perplexity, baseline.perplexity),
                    time=_ratio(seconds_per_token(result, time), seconds_per_token(timed_baseline, time)),
                    energy=_ratio(result.energy_j_per_token, timed_baseline.energy_j_per_token))


def score(rel: Relative, objective: ObjectiveConfig) -> float | None:
    """``P^e * (alpha * T + beta * E)``. Without energy (allowed by ``energy: optional``) the time term
    alone: ``P^e * T``; with both weights 0: ``P^e``. None when a needed term was not measured."""
    if rel.perplexity is None:
        return None
    p = rel.perplexity ** objective.perplexity_exponent
    alpha, beta = objective.time_weight, objective.energy_weight
    if alpha == 0 and beta == 0:
        return p
    if beta > 0 and rel.energy is not None:
        if alpha > 0 and rel.time is None:
            return None
        return p * (alpha * (rel.time or 0.0) + beta * rel.energy)
    if beta > 0 and objective.energy == "required":
        return None
    return None if rel.time is None else p * (rel.time if beta > 0 else alpha * rel.time)


def objective_note(objective: ObjectiveConfig, energy_measured: bool) -> str | None:
    if objective.energy_weight > 0 and not energy_measured:
        return ("no energy counter: the objective used time only, P^e * T (energy: optional); "
                "energy is never estimated")
    return None


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_flags(points: Sequence[Sequence[float | None] | None]) -> list[bool]:
    """For each point (None: a failed trial, never on the front), whether no other point is at least as
    good in every coordinate and better in one (lower is better). A coordinate missing (None) in any
    point is left out for all of them."""
    present = [p for p in points if p is not None]
    if not present:
        return [False] * len(points)
    dims = [d for d in range(len(present[0])) if all(p[d] is not None for p in present)]
    reduced = [None if p is None else tuple(p[d] for d in dims) for p in points]
    others = [p for p in reduced if p is not None]
    return [p is not None and not any(_dominates(q, p) for q in others) for p in reduced]
