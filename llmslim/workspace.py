"""Where a run keeps its state: the output lock and the fingerprinted work
folder that makes runs resumable (publishing is in :mod:`llmslim.publish`).

Layout, beside the output folder ``OUT``::

    .OUT.lock                  # held while a run writes OUT: {"pid", "host", "started"}
    .OUT.work/<steps key>/     # step-0/, step-1/ ... checkpoints, baseline-<key>.json, run.log
    .OUT.staging-<pid>/        # the output being assembled, renamed to OUT at the end

A search (``llmslim search``) keeps, in its own ``.OUT.work/``, a step store shared by its
trials: ``steps/<prefix key>/`` checkpoints with their ``<prefix key>.json`` records, named by
the fingerprint of the recipe prefix up to that step (:func:`llmslim.fingerprints.prefix_key`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from llmslim.errors import OutputError
from llmslim.progress import LOGGER

__all__ = ["OutputLock", "WorkDir", "StepStore", "run_log"]

_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class OutputLock:
    """An exclusive lock on an output folder: a lock file created with O_EXCL|O_NOFOLLOW (never
    through a planted link) and flock-ed while held. A stale lock of a dead process on this host is
    taken over with a warning; a lock of another host is respected (its owner cannot be checked)."""

    def __init__(self, output: Path):
        self.output = output
        self.path = output.parent / f".{output.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            fd = self._create()
            if fd is not None:
                self._fd = fd
                return self
            self._take_over_if_stale()
        raise OutputError(f"cannot take the lock {self.path}: another run keeps taking it")

    def _create(self) -> int | None:
        try:
            fd = os.open(self.path, _LOCK_FLAGS, 0o644)
        except FileExistsError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        return fd

    def _holder(self) -> dict:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{self.path} is a symbolic link, not an llmslim lock; remove it (llmslim never "
                                  "writes through links)") from None
            return {}
        try:  # a live holder keeps its flock; the kernel drops it when the process dies
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            free = True
        except BlockingIOError:
            free = False
        try:
            data = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
        except ValueError:
            data = {}
        finally:
            os.close(fd)
        data = data if isinstance(data, dict) else {}
        data["_flock_free"] = free
        return data

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        host, pid = holder.get("host"), holder.get("pid")
        who = f"pid {pid} on {host}" if host else "an unknown process"
        if host and host != socket.gethostname():
            raise OutputError(f"{self.output} is being written by {who} (lock {self.path}, since "
                              f"{holder.get('started', '?')}); if that run is dead, delete the lock file")
        if not holder["_flock_free"]:
            raise OutputError(f"{self.output} is being written by {who}; wait for it to finish")
        LOGGER.warning("%s: taking over the stale lock of %s, which is no longer running", self.output, who)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            mine = os.fstat(self._fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
        except OSError:
            mine = False
        if mine:
            self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


class WorkDir:
    """Per-key state of a run: completed steps and the cached baseline."""

    def __init__(self, output: Path, key: str):
        self.root = output.parent / f".{output.name}.work"
        self.path = self.root / key[:16]

    def create(self) -> WorkDir:
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.root.iterdir():
            if stale != self.path and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)  # another fingerprint's state is useless now
        return self

    def read_json(self, name: str):
        """A JSON file of the work folder, or None when absent or unreadable (a torn write)."""
        return _read_json(self.path / name)

    def remove(self) -> None:
        if self.root.is_dir() and not self.root.is_symlink():
            shutil.rmtree(self.root, ignore_errors=True)


def _read_json(path: Path):
    """A JSON file, or None when absent or unreadable (a torn write)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class StepStore:
    """Step checkpoints: ``<name>/`` (the checkpoint), ``<name>.json`` (its record, the commit mark),
    ``<name>.scratch/`` (a step's resumable scratch) for one name per step of a recipe.

    A run names them ``step-<i>`` inside its work folder (itself keyed by the steps key); a search names
    them by the prefix keys in a store its trials share."""

    def __init__(self, folder: Path, names: Sequence[str]):
        self.folder, self.names = Path(folder), list(names)

    @classmethod
    def for_run(cls, work: WorkDir, count: int) -> StepStore:
        return cls(work.path, [f"step-{i}" for i in range(count)])

    @classmethod
    def by_prefix(cls, folder: Path, prefixes: Sequence[str]) -> StepStore:
        return cls(folder, [key[:16] for key in prefixes])

    def checkpoint(self, index: int) -> Path:
        return self.folder / self.names[index]

    def record_path(self, index: int) -> Path:
        return self.folder / f"{self.names[index]}.json"

    def scratch(self, index: int) -> Path:
        return self.folder / f"{self.names[index]}.scratch"

    def temporary(self, index: int) -> Path:
        return self.folder / f".{self.names[index]}.tmp"

    def record(self, index: int):
        return _read_json(self.record_path(index))

    def last_completed(self) -> int:
        """Index of the last step whose checkpoint and record are complete (all before it too), or -1."""
        last = -1
        for i in range(len(self.names)):
            if self.record(i) is None or not self.checkpoint(i).is_dir():
                break
            last = i
        return last

    def discard_from(self, index: int) -> None:
        """Forget steps ``index`` .. the last (records first: they are the commit marks)."""
        for i in range(index, len(self.names)):
            self.record_path(i).unlink(missing_ok=True)
            shutil.rmtree(self.checkpoint(i), ignore_errors=True)


@contextmanager
def run_log(path: Path):
    """Copy llmslim's log lines into ``path`` while the block runs."""
    import logging

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
