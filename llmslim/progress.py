"""Progress for long loops: rich bars on a terminal, plain log lines otherwise.

A :class:`Progress` is created per command and passed down explicitly; there
is no global session.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

__all__ = ["Progress", "LOGGER", "setup_logging"]

T = TypeVar("T")
LOGGER = logging.getLogger("llmslim")


def setup_logging(quiet: bool, console: Console) -> None:
    """Console logging on stderr: rich on a terminal, plain text otherwise. With LLMSLIM_DEBUG set the
    logger is at DEBUG, so failures are logged with their traceback."""
    for handler in list(LOGGER.handlers):
        if getattr(handler, "_llmslim_console", False):
            LOGGER.removeHandler(handler)
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler._llmslim_console = True
    _quiet_libraries()
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG if os.environ.get("LLMSLIM_DEBUG") else logging.INFO)
    LOGGER.propagate = False


def _quiet_libraries() -> None:
    """transformers' and the hub's own bars and warnings would interleave with ours; its deprecation
    FutureWarnings (``past_key_values`` ...) are about its API, not the user's run."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    # the same warnings attributed to the caller's frame (torch's Module.__call__ for Llama)
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`\w+` is deprecated and will be removed in version \S+ for `\w+")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()


class Progress:
    """Tracks loops; bars when ``console`` is a terminal and not quiet."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.rich = self.console.is_terminal and not quiet

    def log(self, message: str) -> None:
        LOGGER.info(message)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        if self.rich:
            yield from self._rich(items, description, total)
        else:
            yield from self._plain(items, description, total)

    def _rich(self, items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
        columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with RichProgress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        LOGGER.info("%s: done (%s)", description, total)

    def _plain(self, items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
        start, last = time.perf_counter(), 0.0
        done = 0
        for item in items:
            yield item
            done += 1
            now = time.perf_counter()
            if total and (done == total or now - last >= 10.0):
                last = now
                LOGGER.info("%s: %d/%d (%.1fs)", description, done, total, now - start)
