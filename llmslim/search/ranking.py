"""From finished trials to the search's verdict: relative numbers, scores, the Pareto front and the
selected variants. Pure functions of the trial records."""

from __future__ import annotations

from dataclasses import dataclass

from llmslim.recipe.schema import SearchConfig
from llmslim.report import Metrics
from llmslim.search.objective import pareto_flags, relative, score
from llmslim.search.records import Trial

__all__ = ["Verdict", "rank", "front_point"]


@dataclass(frozen=True)
class Verdict:
    trials: list[Trial]
    selected: list[int]  # trial indices to publish, the first is the output's checkpoint
    status: str  # passed | budget_failed | failed


def front_point(trial: Trial) -> tuple | None:
    """The coordinates the front compares (lower is better), None for a failed trial."""
    if trial.status == "failed" or trial.metrics is None:
        return None
    rel = trial.relative
    return (rel.perplexity, rel.time, float(trial.metrics.size_bytes), rel.energy)


def _order_key(trial: Trial) -> tuple:
    return (trial.score is None, trial.score if trial.score is not None else 0.0,
            trial.relative.perplexity if trial.relative.perplexity is not None else float("inf"), trial.index)


def rank(trials: list[Trial], baseline: Metrics, timed: dict[int, Metrics], search: SearchConfig) -> Verdict:
    """Scores and front for ``trials``; ``timed[i]`` is the original as timed beside trial i."""
    scored = []
    for t in trials:
        if t.status == "failed" or t.metrics is None:
            scored.append(t.model_copy(update={"score": None, "pareto": False, "selected": False}))
            continue
        rel = relative(t.metrics, baseline, timed.get(t.index, baseline), search.objective.time)
        scored.append(t.model_copy(update={"relative": rel, "score": score(rel, search.objective)}))
    flags = pareto_flags([front_point(t) for t in scored])
    scored = [t.model_copy(update={"pareto": flag}) for t, flag in zip(scored, flags)]
    finished = [t for t in scored if t.status != "failed"]
    if not finished:
        return Verdict(scored, [], "failed")
    pool = [t for t in finished if t.pareto] if search.select == "pareto" else finished
    meeting = [t for t in pool if t.status == "passed"]
    best = min(meeting or pool, key=_order_key)
    selected = [best.index] + ([t.index for t in sorted(pool, key=_order_key) if t.index != best.index]
                               if search.select == "pareto" else [])
    status = "passed" if meeting else "budget_failed"
    out = [t.model_copy(update={"selected": t.index in selected}) for t in scored]
    return Verdict(out, selected, status)
