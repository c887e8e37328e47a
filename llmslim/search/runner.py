"""Run a search: validate every trial, then, under the output's lock, measure the original once, run
the trials in order (resumably; shared step prefixes computed once), rank them and publish."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmslim import __version__
from llmslim.errors import EXIT_BUDGET, EXIT_FAILED, EXIT_OK, RecipeError, RecipeProblem
from llmslim.evaluate import prepare_eval_windows
from llmslim.fingerprints import DigestCache, run_keys, sha256_json
from llmslim.modeling import resolve_device, resolve_model_path
from llmslim.outcome import publish_output, record_failure
from llmslim.pipeline import Run, load_input, measure_baseline
from llmslim.progress import LOGGER, Progress
from llmslim.publish import guard_output, output_problem, previous_report, recover
from llmslim.recipe.schema import Recipe
from llmslim.report import write_json_atomic
from llmslim.run_env import environment
from llmslim.search.plan import SearchPlan, TrialSpec, load_search
from llmslim.search.ranking import rank
from llmslim.search.records import SEARCH_FILE, SearchReport, read_search
from llmslim.search.space import draw_trial
from llmslim.search.summary import markdown, plot_front, trial_label
from llmslim.search.trials import Shared, TrialState, load_trial_state, run_trial, save_trial_state
from llmslim.search.trials import trial_record_path
from llmslim.workspace import OutputLock, StepStore, WorkDir, run_log

__all__ = ["SearchOutcome", "run_search", "check_objective"]

STATUS_EXIT = {"passed": EXIT_OK, "budget_failed": EXIT_BUDGET, "failed": EXIT_FAILED}


@dataclass
class SearchOutcome:
    report: SearchReport | None
    exit_code: int
    up_to_date: bool = False


def check_objective(plan: SearchPlan, device) -> None:
    """The objective's terms must be measurable: perplexity always, latency for a time weight, an energy
    counter for an energy weight (unless ``energy: optional``). Never estimated."""
    from llmslim.evaluate.energy import open_energy_meter

    base, obj = plan.base, plan.search.objective
    line, where = None, str(plan.path)
    problems = []
    if base.evaluate.perplexity is None:
        problems.append(RecipeProblem(where, line, "evaluate.perplexity", "a search ranks by perplexity: "
                                      "add evaluate.perplexity"))
    if (obj.time_weight > 0 or obj.energy_weight > 0) and base.evaluate.latency is None:
        problems.append(RecipeProblem(where, line, "evaluate.latency", "the objective weighs time or energy: "
                                      "add evaluate.latency (or set both weights to 0)"))
    if obj.energy_weight > 0 and obj.energy == "required":
        meter = open_energy_meter(device) if base.evaluate.energy else None
        why = "evaluate.energy is false" if meter is None else meter.reason
        if meter is None or not meter.available:
            problems.append(RecipeProblem(where, line, "search.objective.energy_weight",
                                          f"energy cannot be measured here ({why}); set energy_weight: 0, or "
                                          "energy: optional to rank by time alone where no counter exists"))
    if problems:
        raise RecipeError(problems)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _Search:
    plan: SearchPlan
    output: Path
    work: WorkDir
    device: object
    model_path: Path
    digests: DigestCache
    fingerprint: str
    progress: Progress
    announce: Callable[[str], None]
    started: datetime
    t0: float

    @property
    def base(self) -> Recipe:
        return self.plan.base


def run_search(path: Path, overrides: list[str] = (), output: Path | None = None, *, force: bool = False,
               progress: Progress | None = None, announce: Callable[[str], None] = LOGGER.info) -> SearchOutcome:
    """Validate and run the search in ``path``; exit 0 when a selected variant meets the budgets, 3 when
    none does (the front is still written), 1 when every trial failed."""
    progress = progress or Progress(quiet=True)
    plan = load_search(Path(path), list(overrides), output)
    device = resolve_device(plan.base.device)
    check_objective(plan, device)
    announce(f"{plan.base.name}: {plan.count} trials" + (f" ({plan.search.sample.sampler} sampler)"
                                                         if plan.search.sample else " (grid)"))
    out = Path(plan.base.output)
    with OutputLock(out):
        recover(out)
        work = WorkDir(out, "search")
        if force:
            work.remove()
        prev = _previous_search(out)
        model_path = resolve_model_path(plan.base.model)
        digests = DigestCache(known=dict(prev.inputs) if prev else {})
        keys = run_keys(plan.base, plan.base.to_plain(), model_path, str(device), digests)
        fingerprint = sha256_json({"steps": keys.steps, "evaluation": keys.evaluation, "llmslim": __version__,
                                   "recipe": plan.base.to_plain()})
        if not force and prev is not None and prev.fingerprint == fingerprint and output_problem(out) is None:
            announce(f"{plan.base.name}: up to date ({out}), nothing to do")
            return SearchOutcome(prev, STATUS_EXIT[prev.status], up_to_date=True)
        guard_output(out, previous_report(out), plan.base.name, force)
        (work.path / "steps").mkdir(parents=True, exist_ok=True)
        (work.path / "trials").mkdir(exist_ok=True)
        search = _Search(plan, out, work, device, model_path, digests, fingerprint, progress, announce, _now(),
                         time.perf_counter())
        with run_log(work.path / "run.log"):
            return _execute(search)


def _previous_search(out: Path) -> SearchReport | None:
    if not (out / SEARCH_FILE).is_file():
        return None
    try:
        return read_search(out)
    except (OSError, ValueError):
        return None


def _trial_run(search: _Search, recipe: Recipe) -> Run:
    plain = recipe.to_plain()
    keys = run_keys(recipe, plain, search.model_path, str(search.device), search.digests)
    store = StepStore.by_prefix(search.work.path / "steps", keys.prefixes)
    return Run(recipe, plain, sha256_json(plain), keys, search.digests, search.device, search.model_path,
               search.work, store, search.progress, _now(), time.perf_counter())


def _spec(search: _Search, index: int, history: list) -> TrialSpec | TrialState:
    """Trial ``index``'s recipe; a TPE draw the recipe refuses becomes a failed trial's state."""
    from llmslim.search.records import Trial

    plan = search.plan
    if plan.trials:
        return plan.trials[index]
    overrides = draw_trial(plan.search.sample, index, history)
    try:
        return plan.trial(index, overrides)
    except RecipeError as exc:
        return TrialState(Trial(index=index, overrides=overrides, status="failed", error=str(exc),
                                wall_seconds=0.0), None, None)


def _one_trial(search: _Search, shared: Shared, index: int, history: list) -> TrialState:
    spec = _spec(search, index, history)
    if isinstance(spec, TrialState):
        _announce_trial(search, spec, "refused")
        return spec
    run = _trial_run(search, spec.recipe)
    record = trial_record_path(search.work.path / "trials", index, run)
    state = load_trial_state(record)
    how = "recorded before"
    if state is None:
        state = run_trial(run, shared, index, spec.overrides, spec.skipped)
        save_trial_state(record, state)
        how = "computed"
    _announce_trial(search, state, how)
    return state


def _announce_trial(search: _Search, state: TrialState, how: str) -> None:
    t = state.trial
    m = t.metrics
    what = f"perplexity {m.perplexity:.3f}" if m and m.perplexity is not None else (t.error or t.status)
    shared = f", shared steps {','.join(map(str, t.shared_steps))}" if t.shared_steps else ""
    search.announce(f"[{t.index + 1}/{search.plan.count}] {trial_label(t)}: {t.status}, {what}{shared} "
                    f"({t.wall_seconds:.1f} s, {how})")


def _shared(search: _Search) -> Shared:
    base = search.base
    LOGGER.info("%s: loading %s on %s", base.name, base.model, search.device)
    probe = _trial_run(search, base.model_copy(update={"search": None}))
    tokenizer, original = load_input(probe)
    windows = prepare_eval_windows(base.evaluate, tokenizer)
    baseline = measure_baseline(probe, original, windows)
    return Shared(tokenizer, original, windows, baseline, environment(search.device, base.model), {})


def _execute(search: _Search) -> SearchOutcome:
    from llmslim.search.objective import relative, score

    shared = _shared(search)
    states, history = [], []
    objective = search.plan.search.objective
    for index in range(search.plan.count):
        state = _one_trial(search, shared, index, history)
        states.append(state)
        t = state.trial
        value = None
        if t.metrics is not None and state.report is not None:
            value = score(relative(t.metrics, shared.baseline, state.report.baseline, objective.time), objective)
        history.append((t.overrides, value))
    return _finish(search, shared, states)


def _timed(states: list[TrialState]) -> dict:
    return {s.trial.index: s.report.baseline for s in states if s.report is not None and s.report.baseline}


def _finish(search: _Search, shared: Shared, states: list[TrialState]) -> SearchOutcome:
    from llmslim.search.objective import objective_note

    plan = search.plan
    verdict = rank([s.trial for s in states], shared.baseline, _timed(states), plan.search)
    measured = any(t.relative.energy is not None for t in verdict.trials if t.metrics is not None)
    steps = [r for s in states if s.report for r in s.report.steps]
    report = SearchReport(
        name=plan.base.name, status=verdict.status, fingerprint=search.fingerprint, recipe=plan.base.to_plain(),
        objective=plan.search.objective.model_dump(mode="json"),
        objective_note=objective_note(plan.search.objective, measured), select=plan.search.select,
        sampler=plan.search.sample.sampler if plan.search.sample else "grid", environment=shared.environment,
        baseline=shared.baseline, trials=verdict.trials, selected=verdict.selected,
        front_folders={f"front/trial-{i}": i for i in verdict.selected[1:]},
        steps_computed=sum(1 for r in steps if not r.resumed), steps_reused=sum(len(t.shared_steps)
                                                                                for t in verdict.trials),
        inputs=search.digests.used, output=str(search.output), started_at=search.started.isoformat(),
        finished_at=_now().isoformat(), wall_seconds=time.perf_counter() - search.t0)
    log = search.work.path / "run.log"
    if verdict.status == "failed":
        write_json_atomic(search.work.path / SEARCH_FILE, report.model_dump(mode="json"))
        first = next(s.report for s in states if s.report is not None) if any(s.report for s in states) else None
        if first is not None:
            record_failure(search.output, search.work.path, first.recipe, log, first)
        search.announce(f"{plan.base.name}: every trial failed; see {search.work.path / SEARCH_FILE}")
        return SearchOutcome(report, EXIT_FAILED)
    by_index = {s.trial.index: s for s in states}
    best = by_index[verdict.selected[0]]
    checkpoint = search.work.path / "steps" / best.checkpoint
    selected_report = best.report.model_copy(update={"output": str(search.output)})

    def add_files(staged: Path) -> None:
        _write_search_files(staged, report, [(f, by_index[i]) for f, i in report.front_folders.items()], search)

    publish_output(search.output, checkpoint, best.report.recipe, log, selected_report, add_files=add_files)
    search.announce(f"{plan.base.name}: {verdict.status}; selected trial {best.trial.index} "
                    f"({trial_label(best.trial)}) -> {search.output}")
    search.work.remove()
    return SearchOutcome(report, STATUS_EXIT[verdict.status])


def _write_search_files(staged: Path, report: SearchReport, front: list, search: _Search) -> None:
    """search.json, pareto.png, search.md, and (select: pareto) every other front member's checkpoint."""
    from llmslim.outcome import write_extras

    for folder, state in front:
        target = staged / folder
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(search.work.path / "steps" / state.checkpoint, target)
        member = state.report.model_copy(update={"output": str(search.output / folder)})
        write_extras(target, state.report.recipe, Path("/nonexistent"), member)
    plot = plot_front(report, staged / "pareto.png")
    if plot is None:
        LOGGER.info("pareto.png not drawn: install matplotlib (pip install 'llmslim-cli[plot]')")
    write_json_atomic(staged / SEARCH_FILE, report.model_dump(mode="json"))
    (staged / "search.md").write_text(markdown(report, "pareto.png" if plot else None), encoding="utf-8")
