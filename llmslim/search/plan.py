"""A search recipe, validated before anything runs: the `search:` block's keys against the recipe,
and every trial's recipe (as ``--set`` would build it) with located errors blamed on the search line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmslim.errors import RecipeError, RecipeProblem, UsageError
from llmslim.recipe import load_recipe
from llmslim.recipe.loader import parse_override
from llmslim.recipe.schema import Recipe
from llmslim.recipe.yaml_safe import parse_yaml
from llmslim.search.space import grid_trials, space_corners

__all__ = ["SearchPlan", "TrialSpec", "load_search", "skipped_by", "SKIP_RULES"]

# the baseline is measured once per search, so what it depends on is fixed
FIXED_KEYS = ("version", "name", "output", "search", "model", "dtype", "device", "evaluate", "budgets",
              "trust_remote_code", "allow_pickle")
# what makes a step "skipped" in a trial (the step is left out of that variant)
SKIP_RULES = ("prune with heads, mlp and layers all 0; distill with tokens: 0; gptq, rtn, awq or signround with "
              "bits: 0")


@dataclass(frozen=True)
class TrialSpec:
    index: int
    overrides: dict[str, Any]
    recipe: Recipe
    skipped: tuple[int, ...] = ()


@dataclass
class SearchPlan:
    path: Path
    base: Recipe
    user_overrides: list[str]
    output: Path | None
    key_lines: dict[str, tuple[str, int | None]]  # key -> (field label, line)
    trials: list[TrialSpec] = field(default_factory=list)  # known in advance (grid, random)
    count: int = 0

    @property
    def search(self):
        return self.base.search

    def trial(self, index: int, overrides: dict[str, Any]) -> TrialSpec:
        return build_trial(self, index, overrides)


def _value_text(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: what --set reads


def skipped_by(step: dict) -> bool:
    """Whether a step (recipe form, one key) is a 'skip this step' value (see SKIP_RULES)."""
    if not isinstance(step, dict) or len(step) != 1:
        return False
    name, options = next(iter(step.items()))
    options = options if isinstance(options, dict) else {}
    if name == "prune":
        return all(options.get(k) in (0, 0.0, None) for k in ("heads", "mlp", "layers"))
    if name == "distill":
        return options.get("tokens") == 0
    if name in ("gptq", "rtn", "awq", "signround"):
        return options.get("bits") == 0
    return False


def _drop_skipped(skipped: list[int]):
    def edit(data: dict) -> None:
        data.pop("search", None)
        steps = data.get("steps")
        if isinstance(steps, list):
            skipped.extend(i for i, s in enumerate(steps) if skipped_by(s))
            data["steps"] = [s for i, s in enumerate(steps) if i not in skipped]
    return edit


def _relabel(exc: RecipeError, plan: SearchPlan, overrides: dict[str, Any]) -> list[RecipeProblem]:
    """Problems a trial's value caused, blamed on the search key's line in the recipe."""
    labels = {f"--set {k}={_value_text(v)}": k for k, v in overrides.items()}
    out = []
    for p in exc.problems:
        key = labels.get(p.file)
        if key is None:
            out.append(p)
            continue
        label, line = plan.key_lines[key]
        field_text = f" ({p.field})" if p.field and p.field != key.replace(".", "") else ""
        out.append(RecipeProblem(str(plan.path), line, label,
                                 f"value {_value_text(overrides[key])}{field_text}: {p.message}"))
    return out


def build_trial(plan: SearchPlan, index: int, overrides: dict[str, Any]) -> TrialSpec:
    """Trial ``index``'s recipe: the recipe with the user's --set, then the trial's values, skipped steps
    left out; a RecipeError located at the search block's lines when a value is refused."""
    sets = plan.user_overrides + [f"{k}={_value_text(v)}" for k, v in overrides.items()]
    skipped: list[int] = []
    try:
        recipe = load_recipe(plan.path, sets, plan.output, edit=_drop_skipped(skipped))
    except RecipeError as exc:
        raise RecipeError(_relabel(exc, plan, overrides)) from None
    return TrialSpec(index, dict(overrides), recipe, tuple(skipped))


def _key_problem(key: str, plain: dict) -> str | None:
    """Why ``key`` is not a path of the recipe that a search may vary (None: it is)."""
    path, _ = parse_override(f"{key}=0")
    if str(path[0]) in FIXED_KEYS:
        return f"{path[0]} cannot be varied by a search"
    target: Any = plain
    for i, part in enumerate(path):
        where = ".".join(str(p) for p in path[:i]) or "the recipe"
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                return f"{where} has no item {part} (it has {len(target)}, numbered from 0)"
        elif isinstance(target, dict):
            if part not in target:
                known = ", ".join(map(str, target)) or "none"
                return f"{where} has no field {part!r} (it has: {known})"
        else:
            return f"{where} is a single value, it has no field {part!r}"
        target = target[part]
    return None


def _key_lines(path: Path, base: Recipe) -> dict[str, tuple[str, int | None]]:
    data, lines = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    section = ("search", "grid") if base.search.grid is not None else ("search", "sample", "space")
    keys = base.search.grid if base.search.grid is not None else base.search.sample.space
    label = ".".join(section)
    return {k: (f"{label}.{k}", lines.get(section + (k,), lines.get(section))) for k in keys}


def load_search(path: Path, overrides: list[str] = (), output: Path | None = None) -> SearchPlan:
    """The validated search: the base recipe, its keys and (grid, random) every trial's recipe."""
    base = load_recipe(path, list(overrides), output)
    if base.search is None:
        raise UsageError(f"{path}: the recipe has no `search:` block; run it with `llmslim run`")
    plan = SearchPlan(Path(path), base, list(overrides), output, _key_lines(Path(path), base))
    plain = base.to_plain()
    problems = [RecipeProblem(str(path), plan.key_lines[k][1], plan.key_lines[k][0], why)
                for k in plan.key_lines if (why := _key_problem(k, plain))]
    if problems:
        raise RecipeError(problems)
    search = base.search
    if search.grid is not None:
        candidates = grid_trials(search.grid)
    elif search.sample.sampler == "random":
        from llmslim.search.space import draw_trial

        candidates = []
        for i in range(search.sample.trials):
            candidates.append(draw_trial(search.sample, i, [(c, None) for c in candidates]))
    else:
        candidates = space_corners(search.sample.space)
    specs, problems = [], []
    for i, overrides_i in enumerate(candidates):
        try:
            specs.append(build_trial(plan, i, overrides_i))
        except RecipeError as exc:
            problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise RecipeError(problems)
    known = search.grid is not None or search.sample.sampler == "random"
    plan.trials = specs if known else []
    plan.count = len(specs) if known else search.sample.trials
    return plan
