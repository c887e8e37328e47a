"""Domain errors. Each carries the process exit code the CLI maps it to.

Exit codes (documented in the README and in ``llmslim --help``):

* 0 success
* 1 a step or an evaluation failed (the report is still written)
* 2 invalid usage or recipe
* 3 a budget was missed (checkpoint and report are still written)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_BUDGET",
    "LlmslimError",
    "UsageError",
    "RecipeProblem",
    "RecipeError",
    "OutputError",
    "ModelLoadError",
    "StepError",
    "DiskSpaceError",
    "Terminated",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUDGET = 3


class LlmslimError(Exception):
    """Base of every error llmslim reports to the user without a traceback."""

    exit_code = EXIT_FAILED


class UsageError(LlmslimError):
    """The command line or its inputs are wrong; nothing was run."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class RecipeProblem:
    """One thing wrong with a recipe, located in its file."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class RecipeError(UsageError):
    """A recipe failed validation; holds every problem found."""

    def __init__(self, problems: list[RecipeProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class OutputError(UsageError):
    """The output folder is in use or would be overwritten."""


class ModelLoadError(UsageError):
    """The model could not be found or is refused (e.g. pickle weights)."""


class StepError(LlmslimError):
    """A recipe step failed while running."""

    def __init__(self, step: str, message: str):
        self.step = step
        super().__init__(f"step {step!r} failed: {message}")


class DiskSpaceError(LlmslimError):
    """The disk cannot hold what a run must write; completed work is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is; like Ctrl-C, the run stops and keeps its completed steps (exit 143)."""
