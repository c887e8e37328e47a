"""search.json: its schema (pydantic), reading and writing.

``llmslim/schemas/search.schema.json`` is generated from these models
(``python -m llmslim.search.records``) and a test keeps it in sync.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmslim.report import BudgetResult, Environment, Metrics

__all__ = ["SEARCH_SCHEMA_VERSION", "Relative", "Trial", "SearchReport", "read_search", "SEARCH_FILE"]

SEARCH_SCHEMA_VERSION = 1
SEARCH_FILE = "search.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Relative(_Model):
    """The result over the original (lower is better); null where not measured."""

    perplexity: float | None = None
    time: float | None = Field(None, description="seconds per token (objective.time) over the original's, "
                               "both timed alternately in the same process")
    energy: float | None = Field(None, description="joules per token over the original's")


class Trial(_Model):
    index: int
    overrides: dict[str, Any] = Field(description="dotted path -> value, as --set would give it")
    skipped_steps: list[int] = Field(default_factory=list, description="steps of the recipe this trial leaves "
                                     "out (a value meaning 'skip', see the README)")
    status: Literal["passed", "budget_failed", "failed"]
    error: str | None = None
    metrics: Metrics | None = Field(None, description="the result's metrics, as in report.json")
    relative: Relative = Relative()
    score: float | None = Field(None, description="P^e * (alpha * T + beta * E); lower is better")
    budgets: list[BudgetResult] = Field(default_factory=list)
    pareto: bool = False
    selected: bool = False
    shared_steps: list[int] = Field(default_factory=list, description="indices (in this trial's steps) reused "
                                    "from an earlier trial instead of computed")
    fingerprint: str | None = Field(None, description="the trial's steps key")
    wall_seconds: float


class SearchReport(_Model):
    schema_version: Literal[1] = SEARCH_SCHEMA_VERSION
    kind: Literal["search"] = "search"
    name: str
    status: Literal["passed", "budget_failed", "failed"] = Field(
        description="passed: a selected variant meets the budgets; budget_failed: none does; failed: every trial failed")
    fingerprint: str = Field(description="key of the whole search: base recipe, its inputs, the search block")
    recipe: dict[str, Any]
    objective: dict[str, Any]
    objective_note: str | None = Field(None, description="how the objective differs from the recipe's (energy)")
    select: Literal["best", "pareto"]
    sampler: str
    environment: Environment
    baseline: Metrics
    trials: list[Trial]
    selected: list[int] = Field(default_factory=list, description="indices of the published trials")
    front_folders: dict[str, int] = Field(default_factory=dict, description="select: pareto: folder -> trial")
    steps_computed: int = Field(description="step executions in this search (shared prefixes count once)")
    steps_reused: int
    inputs: dict[str, Any] = Field(default_factory=dict)
    output: str
    started_at: str
    finished_at: str
    wall_seconds: float


def read_search(folder: Path) -> SearchReport:
    path = Path(folder)
    path = path / SEARCH_FILE if path.is_dir() else path
    return SearchReport.model_validate_json(path.read_text(encoding="utf-8"))


def json_schema() -> dict:
    return SearchReport.model_json_schema()


if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "schemas" / "search.schema.json"
    target.write_text(json.dumps(json_schema(), indent=2) + "\n")
    print(f"wrote {target}")
