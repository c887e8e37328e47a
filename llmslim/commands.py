"""What the CLI commands do, apart from argument parsing."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from llmslim.errors import EXIT_BUDGET, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from llmslim.progress import Progress, setup_logging

__all__ = ["run_many", "eval_model", "load_report", "eval_option_problem"]


def _worst(codes: list[int]) -> int:
    for code in (EXIT_USAGE, EXIT_FAILED, EXIT_BUDGET):
        if code in codes:
            return code
    return EXIT_OK


def _run_one(path: Path, overrides: list[str], output: Path | None, dry_run: bool, force: bool,
             progress: Progress, err: Console):
    from llmslim.recipe import load_recipe

    recipe = load_recipe(path, overrides, output)
    if recipe.search is not None:
        raise UsageError(f"{path}: the recipe has a `search:` block; run it with `llmslim search {path}` "
                         "(or remove the block to run it as one recipe)")
    if dry_run:
        from llmslim.plan import plan_recipe
        from llmslim.render import plan_tables

        for table in plan_tables(plan_recipe(recipe)):
            err.print(table)
        return recipe.name, "planned", EXIT_OK, recipe.output, None
    from llmslim.pipeline import run_recipe
    from llmslim.render import report_tables

    outcome = run_recipe(recipe, force=force, progress=progress)
    if outcome.report is None:  # a non-zero rank of a distributed run: rank 0 reports
        return recipe.name, "follower", outcome.exit_code, recipe.output, None
    status = outcome.report.status + (" (up to date)" if outcome.up_to_date else "")
    if not progress.quiet:
        for table in report_tables(outcome.report):
            err.print(table)
    return recipe.name, status, outcome.exit_code, recipe.output, outcome.report


def _start_distributed() -> int:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1) join the process group; return the rank."""
    from llmslim.distill.distributed import init_distributed

    rank, _ = init_distributed()
    return rank


def run_many(recipes: list[Path], *, overrides: list[str], output: Path | None, dry_run: bool, force: bool,
             quiet: bool, as_json: bool, handle: Callable[[BaseException], int], err: Console) -> int:
    """Run each recipe independently; print a summary; return the worst exit code."""
    rank = _start_distributed()
    quiet = quiet or rank > 0
    setup_logging(quiet, err)
    progress = Progress(err, quiet=quiet)
    rows, reports = [], []
    for path in recipes:
        try:
            name, status, code, out, report = _run_one(path, overrides, output, dry_run, force, progress, err)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - each recipe is independent
            code = handle(exc)
            if isinstance(exc, KeyboardInterrupt):
                raise SystemExit(code) from None
            name, status, out, report = str(path), "error", "-", None
        rows.append((name, status, code, out))
        if report is not None:
            reports.append(report.model_dump(mode="json"))
    if len(recipes) > 1 and not quiet:
        from llmslim.render import summary_table

        err.print(summary_table(rows))
    if as_json and rank == 0:
        payload = reports[0] if len(recipes) == 1 and reports else reports
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    return _worst([r[2] for r in rows])


def eval_option_problem(seqlen: int, max_windows: int | None, dtype: str) -> str | None:
    """What is wrong with ``llmslim eval``'s options, in the options' own words; None when nothing is."""
    from llmslim.recipe.limits import MAX_COUNT, MAX_SEQLEN

    if not 2 <= seqlen <= MAX_SEQLEN:
        return f"--seqlen must be at least 2 and at most {MAX_SEQLEN:,} (got {seqlen})"
    if max_windows is not None and not 1 <= max_windows <= MAX_COUNT:
        return f"--max-windows must be at least 1 and at most {MAX_COUNT:,} (got {max_windows})"
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        return f"--dtype {dtype!r}: expected float32, bfloat16, float16 or auto"
    return None


def _local_model_problem(model_ref: str) -> str | None:
    """Why a model argument that names a path (./x, /x, ~/x, or something that exists) is no model folder.
    Anything else is left to the hub-id resolution (``org/name``)."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"{model_ref}: a file, not a model folder (give the folder holding config.json)"
    if model_ref.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in model_ref):
        return f"model folder not found: {path.absolute()}"
    return None


def _eval_dataset(dataset: str):
    from llmslim.data import check_dataset, parse_dataset
    from llmslim.recipe.schema import _check_dataset

    try:
        _check_dataset(dataset)
    except ValueError as exc:
        raise UsageError(f"--dataset: {exc}") from None
    ds = parse_dataset(dataset, Path.cwd())
    why = check_dataset(ds)
    if why:
        raise UsageError(f"--dataset {dataset!r}: {why}")
    return ds


def eval_model(model_ref: str, dataset: str, *, seqlen: int, max_windows: int | None, latency: bool,
               dtype: str, device: str, err: Console):
    """The evaluation block alone on any model."""
    from llmslim.evaluate import evaluate_model, model_size_bytes, prepare_eval_windows
    from llmslim.modeling import load_model, load_tokenizer, resolve_device, resolve_model_path
    from llmslim.recipe.schema import EvaluateConfig, LatencyConfig, PerplexityConfig

    setup_logging(False, err)
    why = eval_option_problem(seqlen, max_windows, dtype) or _local_model_problem(model_ref)
    if why:
        raise UsageError(why)
    ds = _eval_dataset(dataset)
    cfg = EvaluateConfig(perplexity=PerplexityConfig(dataset=ds.spec(), seqlen=seqlen, max_windows=max_windows),
                         latency=LatencyConfig() if latency else None)
    dev = resolve_device(device)
    path = resolve_model_path(model_ref)
    tokenizer = load_tokenizer(str(path))
    model = load_model(str(path), dtype, dev)
    windows = prepare_eval_windows(cfg, tokenizer)
    return evaluate_model(model, cfg, size_bytes=model_size_bytes(model, path), windows=windows,
                          progress=Progress(err))


def load_report(path: Path):
    """The report in an output folder or a report.json, or a UsageError saying what the file is instead."""
    from pydantic import ValidationError

    from llmslim.report import Report

    file = path / "report.json" if path.is_dir() else path
    if not file.exists():
        raise UsageError(f"{path}: no report.json here" + ("" if path.is_dir() else " (no such file or folder)"))
    if file.is_dir():
        raise UsageError(f"{file} is a folder, not a report file")
    try:
        raw = file.read_bytes()
        data = json.loads(raw)
    except OSError as exc:
        raise UsageError(f"{file}: cannot read the report ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{file}: not a report: not UTF-8 (byte offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not a report: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise UsageError(f"{file}: not a report: JSON nested too deeply") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise UsageError(f"{file}: not an llmslim report (a JSON object with schema_version, status, ...)")
    try:
        return Report.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the top level"
        raise UsageError(f"{file}: not a valid llmslim report ({exc.error_count()} problem(s); first: "
                         f"{where}: {first['msg']})") from None


def newer_failure(path: Path) -> str | None:
    """A line saying that a newer attempt at this output failed, when its report lies beside it."""
    from llmslim.publish import FAILED_REPORT

    folder = path if path.is_dir() else path.parent
    failed = folder / FAILED_REPORT
    if not failed.is_file():
        return None
    try:
        data = json.loads(failed.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"a newer attempt failed; its report {failed} is unreadable"
    if not isinstance(data, dict):
        return None
    when, error = data.get("finished_at", "?"), data.get("error") or "no error recorded"
    return (f"a newer attempt failed ({when}): {error}. This output is from the earlier run; "
            f"the failed attempt's report: {failed}")


def search_one(path: Path, *, overrides: list[str], output: Path | None, force: bool, quiet: bool,
               as_json: bool, err: Console) -> int:
    """``llmslim search``: the trial count first, a line per trial, the ranked table at the end."""
    from rich.text import Text

    from llmslim.render import search_table
    from llmslim.search import run_search

    setup_logging(quiet, err)
    progress = Progress(err, quiet=quiet)

    def announce(line: str) -> None:
        if not quiet:
            err.print(Text(line), highlight=False, soft_wrap=True)

    outcome = run_search(path, overrides, output, force=force, progress=progress, announce=announce)
    if outcome.report is not None and not quiet:
        err.print(search_table(outcome.report))
    if as_json and outcome.report is not None:
        sys.stdout.write(json.dumps(outcome.report.model_dump(mode="json"), indent=2) + "\n")
    return outcome.exit_code


def load_result(path: Path):
    """A run's Report, or a search's SearchReport when ``path`` is a search folder or search.json."""
    from pydantic import ValidationError

    from llmslim.search.records import SEARCH_FILE, read_search

    file = path / SEARCH_FILE if path.is_dir() else path
    if file.name != SEARCH_FILE or not file.is_file():
        return load_report(path)
    try:
        return read_search(file)
    except (OSError, ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise UsageError(f"{file}: not a valid llmslim search record ({first})") from None
