"""The ``llmslim`` command line: thin commands over the library.

Exit codes: 0 success; 1 a step or evaluation failed (the report is still
written); 2 invalid usage or recipe; 3 a budget was missed (checkpoint and
report are still written); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
Set LLMSLIM_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from llmslim import __version__
from llmslim.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, LlmslimError, RecipeError, Terminated
from llmslim.errors import UsageError

EXIT_HELP = ("Exit codes: 0 success; 1 a step or evaluation failed (report still written); "
             "2 invalid usage or recipe; 3 a budget was missed (checkpoint and report still written); "
             "130 interrupted (Ctrl-C); 143 terminated (SIGTERM); completed steps are kept in both. "
             "Set LLMSLIM_DEBUG=1 to see tracebacks.")

app = typer.Typer(help="Compress Hugging Face causal LMs from YAML recipes.\n\n" + EXIT_HELP,
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err_console = Console(stderr=True)
out_console = Console()



# The one table from exception type to (exit code, message prefix).
ERROR_TABLE: list[tuple[type[BaseException], int, str]] = [
    (RecipeError, EXIT_USAGE, "invalid recipe"),
    (LlmslimError, -1, "error"),  # -1: the error's own exit_code
    (Terminated, 143, "terminated (completed steps are kept; rerun to resume)"),
    (KeyboardInterrupt, 130, "interrupted (completed steps are kept; rerun to resume)"),
]


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


def _with_sigterm(fn: Callable[[], int]) -> int:
    """Run ``fn`` with SIGTERM turned into :class:`Terminated` (main thread only), then restore the handler."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return fn()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _handle(exc: BaseException) -> int:
    """Print ``exc`` for a person and return its exit code; tracebacks only when debugging."""
    if os.environ.get("LLMSLIM_DEBUG"):
        err_console.print_exception()
    for kind, code, prefix in ERROR_TABLE:
        if isinstance(exc, kind):
            code = exc.exit_code if code == -1 else code
            text = str(exc)
            sep = "\n" if "\n" in text else " "
            err_console.print(f"[bold red]{prefix}:[/bold red]{sep}{escape(text)}" if text
                              else f"[bold red]{prefix}[/bold red]", highlight=False, soft_wrap=True)
            return code
    err_console.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {escape(str(exc))} "
                      "(set LLMSLIM_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
    return EXIT_FAILED


def _guarded(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI boundary
        return _handle(exc)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmslim {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                         help="Show the version and exit.")] = None) -> None:
    """Compress Hugging Face causal LMs from YAML recipes."""


FORCE_HELP = ("Start clean (discard resumable steps and the cached baseline) and replace an llmslim output of "
              "another recipe; never a folder llmslim did not write.")
RecipesArg = Annotated[list[Path], typer.Argument(help="Recipe YAML files.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: key.path=value (repeatable).")]


@app.command(epilog=EXIT_HELP)
def run(
    recipes: RecipesArg,
    output: Annotated[Optional[Path], typer.Option(help="Output folder (overrides the recipe's).")] = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; load no weights.")] = False,
    force: Annotated[bool, typer.Option(help=FORCE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the final report(s) as JSON on stdout.")] = False,
) -> None:
    """Run recipes one after another, each independent; a summary table at the end."""
    from llmslim.commands import run_many

    if output is not None and len(recipes) > 1:
        err_console.print("[bold red]error:[/bold red] --output needs exactly one recipe")
        raise typer.Exit(EXIT_USAGE)
    code = _with_sigterm(lambda: run_many(recipes, overrides=set_ or [], output=output, dry_run=dry_run,
                                          force=force, quiet=quiet, as_json=json_, handle=_handle,
                                          err=err_console))
    raise typer.Exit(code)


@app.command(epilog=EXIT_HELP)
def validate(recipes: RecipesArg, set_: SetOpt = None) -> None:
    """Validate recipes (for CI linting); loads no model."""
    from llmslim.commands import _worst
    from llmslim.progress import setup_logging
    from llmslim.recipe import load_recipe

    setup_logging(False, err_console)  # notes found while validating (e.g. loaders) are warnings
    codes = []
    for path in recipes:
        code = _guarded(lambda p=path: (load_recipe(p, set_ or []), 0)[1])
        if code == EXIT_OK:
            err_console.print(f"{escape(str(path))}: ok", highlight=False)
        codes.append(code)
    raise typer.Exit(_worst(codes))


@app.command(epilog=EXIT_HELP)
def search(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file with a `search:` block.")],
    output: Annotated[Optional[Path], typer.Option(help="Output folder (overrides the recipe's).")] = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output and redo finished trials.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print search.json on stdout.")] = False,
) -> None:
    """Try the variants of a recipe's `search:` block (shared steps computed once), rank them by
    P^e * (alpha T + beta E), and publish the selected one with search.json, search.md and pareto.png.
    Exit 0: a selected variant meets the budgets; 3: none does (the front is still written); 1: every
    trial failed; 2: invalid search."""
    from llmslim.commands import search_one

    code = _with_sigterm(lambda: _guarded(lambda: search_one(recipe, overrides=set_ or [], output=output,
                                                             force=force, quiet=quiet, as_json=json_,
                                                             err=err_console)))
    raise typer.Exit(code)


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(help="Output or search folders, or report.json / search.json "
                                                "files; several: one leaderboard table.")],
    compare: Annotated[Optional[Path], typer.Option(help="Another output or report to compare with.")] = None,
) -> None:
    """Show a report (or a search) as tables, two results side by side, or several as a leaderboard."""
    from llmslim.commands import load_report, load_result, newer_failure
    from llmslim.render import compare_table, leaderboard_table, report_tables, search_table

    def show() -> int:
        if len(paths) > 1:
            if compare is not None:
                raise UsageError("--compare takes one result; with several, a leaderboard is shown")
            out_console.print(leaderboard_table([(str(p), load_result(p)) for p in paths]))
            return EXIT_OK
        (path,) = paths
        first = load_result(path)
        if getattr(first, "kind", None) == "search":
            out_console.print(search_table(first))
            first = load_report(path) if (path / "report.json").is_file() else None
            if first is None or compare is not None:
                return EXIT_OK if compare is None else _compare_search(first, compare)
        if compare is None:
            for table in report_tables(first):
                out_console.print(table)
            warning = newer_failure(path)
            if warning:
                out_console.print(Text(warning, style="bold yellow"))
        else:
            out_console.print(compare_table(first, load_report(compare)))
        return EXIT_OK

    raise typer.Exit(_guarded(show))


def _compare_search(first, compare: Path) -> int:
    from llmslim.commands import load_report
    from llmslim.render import compare_table

    if first is None:
        raise UsageError("this search folder holds no selected checkpoint to compare")
    out_console.print(compare_table(first, load_report(compare)))
    return EXIT_OK


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="A model folder or hub id (llmslim GPTQ checkpoints too).")],
    dataset: Annotated[str, typer.Option(help="Perplexity text: text:PATH, jsonl:PATH#field, builtin:NAME.")],
    seqlen: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate only the first N windows.")] = None,
    latency: Annotated[bool, typer.Option(help="Also measure prefill/decode speed and energy.")] = True,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
) -> None:
    """Measure one model with the evaluation block alone (baseline numbers)."""
    from llmslim.commands import eval_model
    from llmslim.render import metrics_table

    def go() -> int:
        metrics = eval_model(model, dataset, seqlen=seqlen, max_windows=max_windows, latency=latency,
                             dtype=dtype, device=device, err=err_console)
        if json_:
            sys.stdout.write(json.dumps(metrics.model_dump(mode="json"), indent=2) + "\n")
        else:
            out_console.print(metrics_table({model: metrics}))
        return EXIT_OK

    raise typer.Exit(_guarded(go))


if __name__ == "__main__":
    app()
