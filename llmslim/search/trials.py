"""One search trial: its steps from the shared store (a prefix another trial computed is loaded, not
recomputed), its evaluation, its latency timed alternately with the original, and its record."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from llmslim.budgets import check_budgets
from llmslim.errors import UsageError
from llmslim.fingerprints import sha256_json
from llmslim.modeling import weights_size_bytes
from llmslim.pipeline import Run, build_report, calibration_windows, error_text, invalid_metrics, run_steps
from llmslim.pipeline import step_context
from llmslim.progress import LOGGER
from llmslim.report import Metrics, Report, write_json_atomic
from llmslim.run_env import evaluate_result
from llmslim.search.records import Trial

__all__ = ["Shared", "TrialState", "run_trial", "trial_record_path", "load_trial_state"]


@dataclass
class Shared:
    """What every trial of one search uses: loaded once."""

    tokenizer: object
    original: object  # the input model, never modified (trials start from copies)
    windows: object
    baseline: Metrics
    environment: object
    calibrations: dict  # (calibration block, seed) -> (windows, info)


@dataclass
class TrialState:
    trial: Trial
    report: Report | None  # None when the trial's recipe was refused
    checkpoint: str | None  # the store folder of its final step


def trial_record_path(folder: Path, index: int, run: Run) -> Path:
    return folder / f"{index:03d}-{sha256_json([run.keys.steps, run.keys.evaluation])[:16]}.json"


def load_trial_state(path: Path) -> TrialState | None:
    """A finished trial's record, or None when absent or unreadable (a torn write: rerun it)."""
    import json

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = Report.model_validate(data["report"]) if data.get("report") else None
        return TrialState(Trial.model_validate(data["trial"]), report, data.get("checkpoint"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_trial_state(path: Path, state: TrialState) -> None:
    write_json_atomic(path, {"trial": state.trial.model_dump(mode="json"), "checkpoint": state.checkpoint,
                             "report": state.report.model_dump(mode="json") if state.report else None})


def _calibration(shared: Shared, run: Run):
    recipe = run.recipe
    key = sha256_json([recipe.to_plain().get("calibration"), recipe.seed])
    if key not in shared.calibrations:
        shared.calibrations[key] = calibration_windows(recipe, shared.tokenizer)
    return shared.calibrations[key]


def _owner_path(run: Run, index: int) -> Path:
    return run.store.folder / f"{run.store.names[index]}.trial"


def _shared_steps(run: Run, records, trial_index: int) -> list[int]:
    """Steps restored from the store that another trial computed (marked by an owner file)."""
    shared = []
    for i, record in enumerate(records):
        owner = _owner_path(run, i)
        if not record.resumed:
            owner.write_text(str(trial_index), encoding="utf-8")
        elif not owner.is_file() or owner.read_text(encoding="utf-8").strip() != str(trial_index):
            shared.append(i)
    return shared


def _measure(run: Run, shared: Shared, fields: dict, index: int) -> list[int]:
    """Steps, evaluation, interleaved latency into ``fields``; returns the shared step indices."""
    recipe = run.recipe
    windows, fields["calibration"] = _calibration(shared, run)
    ctx = step_context(run, shared.tokenizer, windows, run.progress)
    model, fields["steps"] = run_steps(run, None, shared.tokenizer, ctx,
                                       fresh=lambda: copy.deepcopy(shared.original))
    shared_steps = _shared_steps(run, fields["steps"], index)
    final_dir = run.store.checkpoint(len(recipe.steps) - 1)
    fields["baseline"], fields["result"] = evaluate_result(recipe, run.device, lambda: shared.original, model,
                                                           shared.baseline, size_bytes=weights_size_bytes(final_dir),
                                                           windows=shared.windows)
    return shared_steps


def run_trial(run: Run, shared: Shared, index: int, overrides: dict, skipped: tuple[int, ...]) -> TrialState:
    """Run one trial; a failure is recorded in its state, never raised (usage errors and Ctrl-C are)."""
    start = time.perf_counter()
    fields: dict = {"environment": shared.environment, "baseline": shared.baseline}
    error, shared_steps = None, []
    try:
        shared_steps = _measure(run, shared, fields, index)
        error = invalid_metrics(fields)
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a failed trial is recorded; the search goes on
        LOGGER.error("%s: trial %d failed: %s", run.recipe.name, index + 1, exc,
                     exc_info=LOGGER.isEnabledFor(logging.DEBUG))
        error = error_text(exc, run)
    if error is None:
        fields["budgets"] = check_budgets(run.recipe.budgets, fields["baseline"], fields["result"])
        status = "passed" if all(b.passed for b in fields["budgets"]) else "budget_failed"
    else:
        status = "failed"
    report = build_report(run, status, fields, error)
    trial = Trial(index=index, overrides=overrides, skipped_steps=list(skipped), status=status,
                  error=error, metrics=report.result if error is None else None, budgets=report.budgets,
                  shared_steps=shared_steps, fingerprint=run.keys.steps,
                  wall_seconds=time.perf_counter() - start)
    last = run.store.names[-1] if error is None else None
    return TrialState(trial, report, last)
