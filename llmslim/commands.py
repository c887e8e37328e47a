"""What the CLI commands do, apart from argument parsing."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from llmslim.errors import EXIT_BUDGET, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from llmslim.progress import Progress, setup_logging

__all__ = ["run_many", "eval_model"]


def _worst(codes: list[int]) -> int:
    for code in (EXIT_USAGE, EXIT_FAILED, EXIT_BUDGET):
        if code in codes:
            return code
    return EXIT_OK


def _run_one(path: Path, overrides: list[str], output: Path | None, dry_run: bool, force: bool,
             progress: Progress, err: Console):
    from llmslim.recipe import load_recipe

    recipe = load_recipe(path, overrides, output)
    if dry_run:
        from llmslim.plan import plan_recipe
        from llmslim.render import plan_table

        err.print(plan_table(plan_recipe(recipe)))
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


def eval_model(model_ref: str, dataset: str, *, seqlen: int, max_windows: int | None, latency: bool,
               dtype: str, device: str, err: Console):
    """The evaluation block alone on any model."""
    from pydantic import ValidationError

    from llmslim.data import check_dataset, parse_dataset
    from llmslim.evaluate import evaluate_model, model_size_bytes, prepare_eval_windows
    from llmslim.modeling import load_model, load_tokenizer, resolve_device, resolve_model_path
    from llmslim.recipe.schema import EvaluateConfig, LatencyConfig, PerplexityConfig

    setup_logging(False, err)
    try:
        ds = parse_dataset(dataset, Path.cwd())
        cfg = EvaluateConfig(perplexity=PerplexityConfig(dataset=ds.spec(), seqlen=seqlen, max_windows=max_windows),
                             latency=LatencyConfig() if latency else None)
    except (ValidationError, UsageError) as exc:
        raise UsageError(f"--dataset {dataset!r}: {str(exc).splitlines()[-1].strip()}") from None
    why = check_dataset(ds)
    if why:
        raise UsageError(f"--dataset {dataset!r}: {why}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {dtype!r}: expected float32, bfloat16, float16 or auto")
    dev = resolve_device(device)
    path = resolve_model_path(model_ref)
    tokenizer = load_tokenizer(str(path))
    model = load_model(str(path), dtype, dev)
    windows = prepare_eval_windows(cfg, tokenizer)
    return evaluate_model(model, cfg, size_bytes=model_size_bytes(model, path), windows=windows,
                          progress=Progress(err))
