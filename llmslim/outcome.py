"""Writing a run's outcome: the published output of a finished run, or the
report of a failed one, without ever losing the previous good output."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from llmslim.errors import DiskSpaceError
from llmslim.progress import LOGGER
from llmslim.publish import FAILED_REPORT, list_files, no_space_message, publish, read_report_json, recover
from llmslim.publish import staging_path
from llmslim.report import Report, write_json_atomic

__all__ = ["publish_output", "record_failure", "write_extras"]


def _plot_curves(folder: Path, report: Report) -> None:
    """distill-step-N.png beside the checkpoint, for each distillation step (needs matplotlib)."""
    from llmslim.distill.records import plot_curves

    for index, step in enumerate(report.steps):
        curves = step.changed.get("curves")
        if isinstance(curves, dict) and curves.get("loss"):
            if plot_curves({f"step {index + 1} ({step.name})": curves}, folder / f"distill-step-{index}.png") is None:
                LOGGER.info("distillation curves not drawn: install matplotlib (pip install 'llmslim-cli[plot]')")
                return


def write_extras(folder: Path, plain: dict, log: Path, report: Report) -> Report:
    """recipe.yaml, run.log and plots, then report.json last, listing every file with its size."""
    (folder / "recipe.yaml").write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")
    if log.is_file():
        shutil.copyfile(log, folder / "run.log")
    _plot_curves(folder, report)
    report = report.model_copy(update={"files": list_files(folder)})
    write_json_atomic(folder / "report.json", report.model_dump(mode="json"))
    return report


def publish_output(output: Path, checkpoint: Path, plain: dict, log: Path, report: Report,
                   add_files: Callable[[Path], None] | None = None) -> Report:
    """Move the final step's checkpoint into a staging folder, complete it and swap it in.
    ``add_files(staged)`` puts more files in it first (a search's table and plot); report.json lists them.

    On failure the checkpoint goes back to the work folder, so a rerun publishes without recomputing."""
    staged = staging_path(output)
    if staged.exists():
        shutil.rmtree(staged)
    checkpoint.rename(staged)
    try:
        if add_files is not None:
            add_files(staged)
        report = write_extras(staged, plain, log, report)
        publish(staged, output)
    except BaseException as exc:  # also Ctrl-C: the checkpoint goes back, the previous output stays
        if staged.is_dir():
            (staged / "report.json").unlink(missing_ok=True)  # first: the staging folder is no result now
            staged.rename(checkpoint)
        recover(output)
        message = no_space_message(exc, output.parent) if isinstance(exc, OSError) else None
        if message:
            raise DiskSpaceError(f"publishing {output}: {message}") from None
        raise
    return report


def record_failure(output: Path, workdir: Path, plain: dict, log: Path, report: Report) -> None:
    """Keep a failed attempt's report in the work folder; beside a previous good output (which stays as
    it was) as ``OUTPUT/.last-failed-report.json``; otherwise as the output itself (report, no weights)."""
    data = report.model_dump(mode="json")
    try:
        write_json_atomic(workdir / "report.json", data)
        previous = read_report_json(output) if output.is_dir() else None
        if previous is not None and previous.get("status") != "failed":
            write_json_atomic(output / FAILED_REPORT, data)
            LOGGER.error("%s: the previous output in %s is kept; this attempt's report: %s",
                         report.name, output, output / FAILED_REPORT)
            return
        staged = staging_path(output)
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        write_extras(staged, plain, log, report)
        publish(staged, output)
    except OSError as exc:  # a full disk must not hide the run's own error
        LOGGER.error("%s: could not write the failure report: %s", report.name,
                     no_space_message(exc, output.parent) or exc)
