"""Run one recipe: load, measure the baseline, run the steps (resumably),
measure the result, check budgets, publish checkpoint + report atomically."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from llmslim.budgets import check_budgets
from llmslim.data import hash_token_ids, load_documents, parse_dataset, sample_windows
from llmslim.errors import EXIT_BUDGET, EXIT_FAILED, EXIT_OK, DiskSpaceError, UsageError
from llmslim.evaluate import evaluate_model, model_size_bytes, prepare_eval_windows
from llmslim.evaluate.memory import PeakMemory
from llmslim.evaluate.perplexity import tokenize_text
from llmslim.fingerprints import DigestCache, RunKeys, run_keys, sha256_json
from llmslim.memory_estimates import step_phase
from llmslim.memory_plan import PhaseLog, plan_for_run
from llmslim.modeling import load_model, load_tokenizer, resolve_device, resolve_model_path, save_checkpoint
from llmslim.modeling import weights_size_bytes
from llmslim.outcome import publish_output, record_failure
from llmslim.progress import LOGGER, Progress
from llmslim.publish import guard_output, no_space_message, output_problem, previous_report, writing_step
from llmslim.publish import recover
from llmslim.recipe.schema import Recipe
from llmslim.report import Calibration, Metrics, Report, StepRecord, write_json_atomic
from llmslim.run_env import environment, evaluate_result, source_info
from llmslim.steps import StepContext, run_step
from llmslim.stream_run import streamed_run
from llmslim.workspace import OutputLock, StepStore, WorkDir, run_log

__all__ = ["RunOutcome", "run_recipe", "exit_code_for", "Run", "run_steps", "measure_baseline", "step_context",
           "calibration_windows", "build_report", "invalid_metrics", "error_text", "load_original", "load_input",
           "step_record", "commit_step"]

STATUS_EXIT = {"passed": EXIT_OK, "budget_failed": EXIT_BUDGET, "failed": EXIT_FAILED}


def exit_code_for(status: str) -> int:
    return STATUS_EXIT[status]


@dataclass
class RunOutcome:
    report: Report | None  # None on the non-zero ranks of a distributed run
    exit_code: int
    up_to_date: bool = False


def is_follower() -> bool:
    """True on ranks other than 0 of a torchrun/accelerate launch: they compute, rank 0 writes."""
    from llmslim.distill.distributed import world

    return world()[0] != 0


@dataclass
class Run:
    """One run's fixed facts, shared by its phases."""

    recipe: Recipe
    plain: dict
    recipe_hash: str
    keys: RunKeys
    digests: DigestCache
    device: torch.device
    model_path: Path
    work: WorkDir
    store: StepStore
    progress: Progress
    started: datetime
    t0: float
    memory: PhaseLog | None = None  # the memory plan and each phase's measured peaks (the report's `memory`)

    @property
    def output(self) -> Path:
        return Path(self.recipe.output)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_recipe(recipe: Recipe, *, force: bool = False, progress: Progress | None = None) -> RunOutcome:
    """Run ``recipe``; returns its report and the exit code (0, 1 or 3)."""
    progress = progress or Progress(quiet=True)
    output = Path(recipe.output)
    if recipe.search is not None:
        raise UsageError(f"recipe {recipe.name!r} has a `search:` block: run it with `llmslim search RECIPE` "
                         "(or remove the block to run it as one recipe)")
    if is_follower():
        return _follow(recipe, force, progress)
    with OutputLock(output):
        recover(output)
        if force:
            WorkDir(output, "").remove()  # --force starts clean: no resumed step, no cached baseline
        run, prev = _prepare(recipe, progress)
        outcome = _up_to_date(run, prev) if not force else None
        if outcome is not None:
            return outcome
        guard_output(output, prev, recipe.name, force)
        run.work.create()
        with run_log(run.work.path / "run.log"):
            return _execute(run)


def _prepare(recipe: Recipe, progress: Progress) -> tuple[Run, Report | None]:
    output = Path(recipe.output)
    prev = previous_report(output)
    plain = recipe.to_plain()
    model_path = resolve_model_path(recipe.model)
    device = resolve_device(recipe.device)
    digests = DigestCache(known=dict(prev.inputs) if prev else {})
    keys = run_keys(recipe, plain, model_path, str(device), digests)
    work = WorkDir(output, keys.steps)
    run = Run(recipe, plain, sha256_json(plain), keys, digests, device, model_path, work,
               StepStore.for_run(work, len(recipe.steps)), progress, _now(), time.perf_counter())
    return run, prev


def _up_to_date(run: Run, prev: Report | None) -> RunOutcome | None:
    """The previous output when it is this recipe's, complete and computed from the same inputs; its
    budgets re-checked (and its report rewritten) when only they changed. None: run again."""
    if prev is None or prev.status == "failed" or prev.name != run.recipe.name:
        return None
    if any(m is not None and m.invalid for m in (prev.baseline, prev.result)):
        return None  # written before non-finite metrics failed a run
    if prev.fingerprint != run.keys.steps or prev.evaluation_fingerprint != run.keys.evaluation:
        return None
    problem = output_problem(run.output)
    if problem is not None:
        LOGGER.warning("%s: the output in %s is incomplete (%s); running again", run.recipe.name, run.output, problem)
        return None
    if prev.recipe.get("budgets") != run.plain.get("budgets") and prev.baseline and prev.result:
        budgets = check_budgets(run.recipe.budgets, prev.baseline, prev.result)
        status = "passed" if all(b.passed for b in budgets) else "budget_failed"
        prev = prev.model_copy(update={"budgets": budgets, "status": status, "recipe": run.plain,
                                       "recipe_sha256": run.recipe_hash})
        write_json_atomic(run.output / "report.json", prev.model_dump(mode="json"))
        LOGGER.info("%s: up to date; budgets re-checked against the stored metrics: %s", run.recipe.name, status)
    else:
        LOGGER.info("%s: up to date (%s), nothing to do", run.recipe.name, run.output)
    run.work.remove()  # what a run killed after publishing left (other keys' state is dropped by any run)
    return RunOutcome(prev, exit_code_for(prev.status), up_to_date=True)


def _follow(recipe: Recipe, force: bool, progress: Progress) -> RunOutcome:
    """A non-zero rank: the same steps in memory (distill trains data-parallel), nothing written."""
    run, prev = _prepare(recipe, progress)
    if not force and prev is not None and _same_inputs(run, prev):
        return RunOutcome(None, exit_code_for(prev.status), up_to_date=True)
    tokenizer = load_tokenizer(str(run.model_path), recipe.trust_remote_code)
    model = _follower_input(run)
    calibration, _ = calibration_windows(recipe, tokenizer)
    run_steps(run, model, tokenizer, step_context(run, tokenizer, calibration, Progress(quiet=True)), save=False)
    return RunOutcome(None, EXIT_OK)


def _follower_input(run: Run):
    """A follower's input model: when the first step distils with ``parallel: fsdp`` its shards are
    filled from rank 0's weights, so it is built from its config on the meta device (no weights read);
    otherwise loaded, to repeat the steps before the distillation in memory."""
    steps = run.recipe.steps
    if steps and steps[0].STEP_NAME == "distill" and steps[0].parallel == "fsdp":
        from llmslim.distill.sharding import empty_model

        return empty_model(str(run.model_path)).requires_grad_(True)
    return load_original(run)


def _same_inputs(run: Run, prev: Report) -> bool:
    return (prev.status != "failed" and prev.fingerprint == run.keys.steps
            and prev.evaluation_fingerprint == run.keys.evaluation and output_problem(run.output) is None)


def load_original(run: Run):
    recipe = run.recipe
    return load_model(str(run.model_path), recipe.dtype, run.device, trust_remote_code=recipe.trust_remote_code,
                      allow_pickle=recipe.allow_pickle)


def load_input(run: Run):
    """The recipe's tokenizer and input model, on the run's device."""
    return load_tokenizer(str(run.model_path), run.recipe.trust_remote_code), load_original(run)


def step_context(run: Run, tokenizer, calibration, progress: Progress) -> StepContext:
    return StepContext(tokenizer=tokenizer, device=run.device, seed=run.recipe.seed, progress=progress,
                       calibration=calibration, model_path=run.model_path, dtype=run.recipe.dtype)


def calibration_windows(recipe: Recipe, tokenizer) -> tuple[torch.Tensor | None, Calibration | None]:
    cal = recipe.calibration
    if cal is None:
        return None, None
    ids = tokenize_text(tokenizer, load_documents(parse_dataset(cal.dataset)))
    windows = sample_windows(ids, cal.samples, cal.seqlen, recipe.seed)
    info = Calibration(dataset=cal.dataset, samples=cal.samples, seqlen=cal.seqlen,
                       token_ids_sha256=hash_token_ids(windows))
    return windows, info


def _execute(run: Run) -> RunOutcome:
    recipe, fields = run.recipe, {}
    fields["environment"] = environment(run.device, recipe.model)
    LOGGER.info("%s: loading %s on %s", recipe.name, recipe.model, run.device)
    plan = plan_for_run(recipe)
    streamed = streamed_run(run, plan)  # None: every phase resident, as before (UsageError: a step cannot stream)
    run.memory = PhaseLog(plan, run.device)
    with run.memory.measure("load"):  # a streamed run reads weights only when a phase needs them
        tokenizer, model = load_input(run) if streamed is None else \
            (load_tokenizer(str(run.model_path), recipe.trust_remote_code), None)
        windows = prepare_eval_windows(recipe.evaluate, tokenizer)  # the tokenizer's peak is the load phase's
        calibration, fields["calibration"] = calibration_windows(recipe, tokenizer)
    try:
        fields["baseline"] = measure_baseline(
            run, model, windows, evaluate=None if streamed is None else (lambda: streamed.baseline(windows)))
        if fields["baseline"].invalid:  # no point compressing a model that cannot be measured
            return _finish_failed(run, fields, invalid_metrics(fields))
        ctx = step_context(run, tokenizer, calibration, run.progress)
        if streamed is None:
            model, fields["steps"] = run_steps(run, model, tokenizer, ctx)
        else:
            fields["steps"] = streamed.steps(tokenizer, ctx)
        final_dir = run.store.checkpoint(len(recipe.steps) - 1)
        LOGGER.info("%s: evaluating the result", recipe.name)
        with run.memory.measure("evaluate"):
            if streamed is None:
                fields["baseline"], fields["result"] = evaluate_result(
                    recipe, run.device, lambda: load_original(run), model, fields["baseline"],
                    size_bytes=weights_size_bytes(final_dir), windows=windows, progress=run.progress)
            else:
                fields["baseline"], fields["result"] = streamed.evaluate(fields["baseline"], final_dir, windows)
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a step or evaluation is reported, exit 1
        LOGGER.error("%s: %s", recipe.name, exc, exc_info=LOGGER.isEnabledFor(logging.DEBUG))
        return _finish_failed(run, fields, error_text(exc, run))
    invalid = invalid_metrics(fields)
    if invalid:
        LOGGER.error("%s: %s", recipe.name, invalid)
        return _finish_failed(run, fields, invalid)
    fields["budgets"] = check_budgets(recipe.budgets, fields["baseline"], fields["result"])
    status = "passed" if all(b.passed for b in fields["budgets"]) else "budget_failed"
    try:
        report = publish_output(run.output, final_dir, run.plain, run.work.path / "run.log",
                                build_report(run, status, fields))
    except DiskSpaceError as exc:
        LOGGER.error("%s: %s", recipe.name, exc)
        return _finish_failed(run, fields, str(exc))
    LOGGER.info("%s: %s -> %s", recipe.name, status, run.output)
    run.work.remove()
    return RunOutcome(report, exit_code_for(status))


def error_text(exc: Exception, run: Run) -> str:
    if isinstance(exc, OSError):
        message = no_space_message(exc, run.work.path)
        if message:
            return message
    return str(exc) if isinstance(exc, DiskSpaceError) else f"{type(exc).__name__}: {exc}"


def invalid_metrics(fields: dict) -> str | None:
    """Non-finite measurements fail the run; the values themselves are already null."""
    parts = []
    for which in ("baseline", "result"):
        metrics = fields.get(which)
        for name, why in (getattr(metrics, "invalid", None) or {}).items():
            parts.append(f"{which} {name}: {why}")
    return ("non-finite metric: " + "; ".join(parts)) if parts else None


def measure_baseline(run: Run, model, windows, evaluate: Callable[[], Metrics] | None = None) -> Metrics:
    """The original model's metrics, cached in the work folder; ``evaluate`` measures them instead of
    :func:`evaluate_model` on ``model`` (a streamed run)."""
    name = f"baseline-{run.keys.baseline[:16]}.json"
    cached = run.work.read_json(name)
    if cached is not None:
        LOGGER.info("%s: baseline restored from the work folder", run.recipe.name)
        return Metrics.model_validate(cached)
    LOGGER.info("%s: evaluating the original model (baseline)", run.recipe.name)
    with run.memory.measure("baseline") if run.memory else nullcontext():
        metrics = evaluate() if evaluate is not None else evaluate_model(
            model, run.recipe.evaluate, size_bytes=model_size_bytes(model, run.model_path), windows=windows,
            seed=run.recipe.seed, progress=run.progress)
    if not getattr(metrics, "invalid", None):
        write_json_atomic(run.work.path / name, metrics.model_dump(mode="json"))
    return metrics


def _resume(run: Run, ctx: StepContext, model, fresh=None):
    """The model after the last completed step whose checkpoint loads, and that step's index (-1: none).
    A checkpoint or record that fails to load is discarded with a warning and recomputed."""
    store = run.store
    done = store.last_completed()
    while done >= 0:
        try:
            StepRecord.model_validate(store.record(done))
            resumed = load_model(str(store.checkpoint(done)), run.recipe.dtype, ctx.device)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is recomputed
            LOGGER.warning("%s: the checkpoint of step %d cannot be loaded (%s); computing it again",
                           run.recipe.name, done + 1, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            store.discard_from(done)
            done -= 1
            continue
        LOGGER.info("%s: resuming after step %d (%s)", run.recipe.name, done + 1, run.recipe.steps[done].STEP_NAME)
        return resumed, done
    return (fresh() if model is None and fresh is not None else model), -1


def run_steps(run: Run, model, tokenizer, ctx: StepContext, save: bool = True, fresh=None):
    """Run the recipe's steps after the last stored one; each is checkpointed in ``run.store``.
    ``model`` None: ``fresh()`` gives the input model when no stored step can be resumed from."""
    steps, store, records = run.recipe.steps, run.store, []
    model, done = _resume(run, ctx, model, fresh) if save else (model, -1)
    for index, step in enumerate(steps):
        if index <= done:
            records.append(StepRecord.model_validate(store.record(index)).model_copy(update={"resumed": True}))
            continue
        LOGGER.info("%s: step %d/%d %s", run.recipe.name, index + 1, len(steps), step.describe())
        start = time.perf_counter()
        scratch = store.scratch(index)
        if save:
            scratch.mkdir(parents=True, exist_ok=True)
        with PeakMemory(ctx.device) as peak:
            outcome = run_step(model, step, replace(ctx, scratch=scratch))
        record = step_record(step, start, peak, outcome)
        if run.memory is not None:
            run.memory.record(step_phase(index, step), peak.peak_bytes, peak.host_peak_bytes,
                              record.wall_seconds, peak.host_method)
        if save:
            _save_step(store, index, model, tokenizer, record, run.recipe.memory.max_shard_size)
        records.append(record)
    return model, records


def step_record(step, start: float, peak: PeakMemory, outcome) -> StepRecord:
    """What the report and the work folder keep of a step that ran now (``start``: its perf_counter start)."""
    return StepRecord(name=step.STEP_NAME, options=step.model_dump(mode="json"),
                      wall_seconds=time.perf_counter() - start, peak_memory_bytes=peak.peak_bytes,
                      changed=outcome.changed, layers=outcome.layers)


def _save_step(store: StepStore, index: int, model, tokenizer, record: StepRecord,
               max_shard_size: int | None = None) -> None:
    """Checkpoint after a step: written aside, renamed, then its record (the commit mark)."""
    final, tmp = store.checkpoint(index), store.temporary(index)
    with writing_step(final, tmp, index, model_size_bytes(model, None) + 50_000_000):
        save_checkpoint(model, tokenizer, tmp, max_shard_size)
    tmp.rename(final)
    commit_step(store, index, record)


def commit_step(store: StepStore, index: int, record: StepRecord) -> None:
    """Step ``index``'s checkpoint is in place: its record marks it complete; its scratch goes."""
    import shutil

    write_json_atomic(store.record_path(index), record.model_dump(mode="json"))
    shutil.rmtree(store.scratch(index), ignore_errors=True)


def build_report(run: Run, status: str, fields: dict, error: str | None = None) -> Report:
    finished = _now()
    source = source_info(run.recipe.model)
    recipe = dict(run.plain, source=source) if source else run.plain
    return Report(status=status, error=error, name=run.recipe.name, recipe=recipe,
                  recipe_sha256=run.recipe_hash, fingerprint=run.keys.steps,
                  evaluation_fingerprint=run.keys.evaluation, output=run.recipe.output,
                  inputs=run.digests.used, started_at=run.started.isoformat(), finished_at=finished.isoformat(),
                  wall_seconds=time.perf_counter() - run.t0,
                  memory=run.memory.report() if run.memory is not None else None, **fields)


def _finish_failed(run: Run, fields: dict, error: str) -> RunOutcome:
    """A failed run keeps its work folder (for resume) and never replaces a good output."""
    report = build_report(run, "failed", fields, error)
    record_failure(run.output, run.work.path, run.plain, run.work.path / "run.log", report)
    return RunOutcome(report, EXIT_FAILED)
