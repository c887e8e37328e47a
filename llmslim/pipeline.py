"""Run one recipe: load, measure the baseline, run the steps (resumably),
measure the result, check budgets, publish checkpoint + report atomically."""

from __future__ import annotations

import logging
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
import yaml

from llmslim import __version__
from llmslim.budgets import check_budgets
from llmslim.data import file_digest, hash_token_ids, load_documents, parse_dataset, sample_windows
from llmslim.errors import EXIT_BUDGET, EXIT_FAILED, EXIT_OK, OutputError, UsageError
from llmslim.evaluate import evaluate_model, model_size_bytes, prepare_eval_windows
from llmslim.evaluate.memory import PeakMemory
from llmslim.evaluate.perplexity import tokenize_text
from llmslim.modeling import load_model, load_tokenizer, resolve_device, resolve_model_path, save_checkpoint
from llmslim.modeling import weights_size_bytes
from llmslim.progress import LOGGER, Progress
from llmslim.recipe.schema import Recipe
from llmslim.report import Calibration, Environment, Metrics, Report, StepRecord, read_report, write_json_atomic
from llmslim.steps import StepContext, run_step
from llmslim.workspace import OutputLock, WorkDir, fingerprint, model_identity, publish, sha256_json, staging_dir

__all__ = ["RunOutcome", "run_recipe", "exit_code_for"]

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
class _Run:
    """One run's fixed facts, shared by its phases."""

    recipe: Recipe
    plain: dict
    recipe_hash: str
    fp: str
    model_path: Path
    work: WorkDir
    progress: Progress
    started: datetime
    t0: float


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _previous_report(output: Path) -> Report | None:
    try:
        return read_report(output) if (output / "report.json").is_file() else None
    except ValueError:
        return None


def _guard_output(output: Path, prev: Report | None, name: str, force: bool) -> None:
    """Never overwrite silently: only with --force or when it is this recipe's own output."""
    if not output.exists() or force:
        return
    if prev is None:
        raise OutputError(f"output folder {output} exists and was not written by llmslim; "
                          "choose another output or pass --force")
    if prev.name != name:
        raise OutputError(f"output folder {output} holds the output of recipe {prev.name!r}, not {name!r}; "
                          "choose another output or pass --force")


def _data_digests(recipe: Recipe) -> dict:
    digests = {}
    if recipe.calibration is not None:
        digests["calibration"] = file_digest(parse_dataset(recipe.calibration.dataset))
    return digests


@contextmanager
def _run_log(path: Path):
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        handler.close()


def run_recipe(recipe: Recipe, *, force: bool = False, progress: Progress | None = None) -> RunOutcome:
    """Run ``recipe``; returns its report and the exit code (0, 1 or 3)."""
    progress = progress or Progress(quiet=True)
    output = Path(recipe.output)
    if is_follower():
        return _follow(recipe, force, progress)
    with OutputLock(output):
        run, prev = _prepare(recipe, progress)
        if _up_to_date(run, prev, force):
            LOGGER.info("%s: up to date (%s), nothing to do", recipe.name, output)
            return RunOutcome(prev, exit_code_for(prev.status), up_to_date=True)
        _guard_output(output, prev, recipe.name, force)
        run.work.create()
        with _run_log(run.work.path / "run.log"):
            return _execute(run)


def _prepare(recipe: Recipe, progress: Progress) -> tuple[_Run, Report | None]:
    plain = recipe.to_plain()
    model_path = resolve_model_path(recipe.model)
    fp = fingerprint(plain, model_identity(model_path), _data_digests(recipe))
    output = Path(recipe.output)
    run = _Run(recipe, plain, sha256_json(plain), fp, model_path, WorkDir(output, fp), progress, _now(),
               time.perf_counter())
    return run, _previous_report(output)


def _up_to_date(run: _Run, prev: Report | None, force: bool) -> bool:
    output = Path(run.recipe.output)
    return (prev is not None and not force and prev.fingerprint == run.fp and prev.recipe_sha256 == run.recipe_hash
            and prev.status != "failed" and (output / "config.json").is_file())


def _follow(recipe: Recipe, force: bool, progress: Progress) -> RunOutcome:
    """A non-zero rank: the same steps in memory (distill trains data-parallel), nothing written."""
    run, prev = _prepare(recipe, progress)
    if _up_to_date(run, prev, force):
        return RunOutcome(None, exit_code_for(prev.status), up_to_date=True)
    device = resolve_device(recipe.device)
    tokenizer, model = _load_input(run, device)
    calibration, _ = _calibration(recipe, tokenizer)
    _run_steps(run, model, tokenizer, _step_context(run, tokenizer, device, calibration, Progress(quiet=True)),
               save=False)
    return RunOutcome(None, EXIT_OK)


def _load_input(run: _Run, device: torch.device):
    """The recipe's tokenizer and input model, on ``device``."""
    recipe = run.recipe
    tokenizer = load_tokenizer(str(run.model_path), recipe.trust_remote_code)
    model = load_model(str(run.model_path), recipe.dtype, device, trust_remote_code=recipe.trust_remote_code,
                       allow_pickle=recipe.allow_pickle)
    return tokenizer, model


def _step_context(run: _Run, tokenizer, device: torch.device, calibration, progress: Progress) -> StepContext:
    return StepContext(tokenizer=tokenizer, device=device, seed=run.recipe.seed, progress=progress,
                       calibration=calibration, model_path=run.model_path, dtype=run.recipe.dtype)


def _environment(device: torch.device) -> Environment:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return Environment(python=platform.python_version(), torch=torch.__version__,
                       transformers=transformers.__version__, llmslim=__version__,
                       device=f"{device} ({name})", platform=platform.platform())


def _calibration(recipe: Recipe, tokenizer) -> tuple[torch.Tensor | None, Calibration | None]:
    cal = recipe.calibration
    if cal is None:
        return None, None
    ids = tokenize_text(tokenizer, load_documents(parse_dataset(cal.dataset)))
    windows = sample_windows(ids, cal.samples, cal.seqlen, recipe.seed)
    info = Calibration(dataset=cal.dataset, samples=cal.samples, seqlen=cal.seqlen,
                       token_ids_sha256=hash_token_ids(windows))
    return windows, info


def _execute(run: _Run) -> RunOutcome:
    recipe, fields = run.recipe, {}
    device = resolve_device(recipe.device)
    fields["environment"] = _environment(device)
    LOGGER.info("%s: loading %s on %s", recipe.name, recipe.model, device)
    tokenizer, model = _load_input(run, device)
    windows = prepare_eval_windows(recipe.evaluate, tokenizer)
    calibration, fields["calibration"] = _calibration(recipe, tokenizer)
    try:
        fields["baseline"] = _baseline(run, model, windows)
        ctx = _step_context(run, tokenizer, device, calibration, run.progress)
        model, fields["steps"] = _run_steps(run, model, tokenizer, ctx)
        final_dir = run.work.step_dir(len(recipe.steps) - 1)
        LOGGER.info("%s: evaluating the result", recipe.name)
        fields["result"] = evaluate_model(model, recipe.evaluate, size_bytes=weights_size_bytes(final_dir),
                                          windows=windows, seed=recipe.seed, progress=run.progress)
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a step or evaluation is reported, exit 1
        LOGGER.error("%s: %s", recipe.name, exc, exc_info=LOGGER.isEnabledFor(logging.DEBUG))
        return _finish_failed(run, fields, f"{type(exc).__name__}: {exc}")
    fields["budgets"] = check_budgets(recipe.budgets, fields["baseline"], fields["result"])
    status = "passed" if all(b.passed for b in fields["budgets"]) else "budget_failed"
    report = _report(run, status, fields)
    _publish_output(run, final_dir, report)
    return RunOutcome(report, exit_code_for(status))


def _baseline(run: _Run, model, windows) -> Metrics:
    cached = run.work.read_json("baseline.json")
    if cached is not None:
        LOGGER.info("%s: baseline restored from the work folder", run.recipe.name)
        return Metrics.model_validate(cached)
    LOGGER.info("%s: evaluating the original model (baseline)", run.recipe.name)
    metrics = evaluate_model(model, run.recipe.evaluate, size_bytes=model_size_bytes(model, run.model_path),
                             windows=windows, seed=run.recipe.seed, progress=run.progress)
    write_json_atomic(run.work.path / "baseline.json", metrics.model_dump(mode="json"))
    return metrics


def _run_steps(run: _Run, model, tokenizer, ctx: StepContext, save: bool = True):
    steps, work, records = run.recipe.steps, run.work, []
    done = work.last_completed(len(steps))
    if done >= 0:
        LOGGER.info("%s: resuming after step %d (%s)", run.recipe.name, done + 1, steps[done].STEP_NAME)
        model = load_model(str(work.step_dir(done)), run.recipe.dtype, ctx.device)
    for index, step in enumerate(steps):
        if index <= done:
            record = StepRecord.model_validate(run.work.read_json(work.record_path(index).name))
            records.append(record.model_copy(update={"resumed": True}))
            continue
        LOGGER.info("%s: step %d/%d %s", run.recipe.name, index + 1, len(steps), step.describe())
        start = time.perf_counter()
        scratch = work.path / f"step-{index}.scratch"
        if save:
            scratch.mkdir(exist_ok=True)
        with PeakMemory(ctx.device) as peak:
            outcome = run_step(model, step, replace(ctx, scratch=scratch))
        record = StepRecord(name=step.STEP_NAME, options=step.model_dump(mode="json"),
                            wall_seconds=time.perf_counter() - start, peak_memory_bytes=peak.peak_bytes,
                            changed=outcome.changed, layers=outcome.layers)
        if save:
            _save_step(work, index, model, tokenizer, record)
        records.append(record)
    return model, records


def _save_step(work: WorkDir, index: int, model, tokenizer, record: StepRecord) -> None:
    """Checkpoint after a step: written aside, renamed, then its record (the commit mark)."""
    final, tmp = work.step_dir(index), work.path / f".step-{index}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    save_checkpoint(model, tokenizer, tmp)
    tmp.rename(final)
    write_json_atomic(work.record_path(index), record.model_dump(mode="json"))
    shutil.rmtree(work.path / f"step-{index}.scratch", ignore_errors=True)


def _report(run: _Run, status: str, fields: dict, error: str | None = None) -> Report:
    finished = _now()
    return Report(status=status, error=error, name=run.recipe.name, recipe=run.plain,
                  recipe_sha256=run.recipe_hash, fingerprint=run.fp, output=run.recipe.output,
                  started_at=run.started.isoformat(), finished_at=finished.isoformat(),
                  wall_seconds=time.perf_counter() - run.t0, **fields)


def _write_extras(folder: Path, run: _Run, report: Report) -> None:
    write_json_atomic(folder / "report.json", report.model_dump(mode="json"))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(run.plain, sort_keys=False), encoding="utf-8")
    log = run.work.path / "run.log"
    if log.is_file():
        shutil.copyfile(log, folder / "run.log")


def _publish_output(run: _Run, final_dir: Path, report: Report) -> None:
    output = Path(run.recipe.output)
    staged = staging_dir(output)
    try:
        staged.rmdir()
        final_dir.rename(staged)
        LOGGER.info("%s: %s -> %s", run.recipe.name, report.status, output)
        _write_extras(staged, run, report)
        publish(staged, output)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    run.work.remove()


def _finish_failed(run: _Run, fields: dict, error: str) -> RunOutcome:
    """A failed run keeps its work folder (for resume) and never replaces a good output."""
    report = _report(run, "failed", fields, error)
    output = Path(run.recipe.output)
    write_json_atomic(run.work.path / "report.json", report.model_dump(mode="json"))
    if not output.exists():
        staged = staging_dir(output)
        _write_extras(staged, run, report)
        publish(staged, output)
    else:
        LOGGER.error("%s: the previous output in %s is kept; this run's report: %s",
                     run.recipe.name, output, run.work.path / "report.json")
    return RunOutcome(report, EXIT_FAILED)
