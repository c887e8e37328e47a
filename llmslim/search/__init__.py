"""``llmslim search``: many variants of one recipe, sharing their common steps, ranked by
``P^e * (alpha * T + beta * E)`` and drawn as a Pareto front."""

from __future__ import annotations

__all__ = ["run_search"]


def run_search(*args, **kwargs):
    from llmslim.search.runner import run_search as run

    return run(*args, **kwargs)
