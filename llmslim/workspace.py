"""Where a run keeps its state: the output lock, the fingerprinted work folder
that makes runs resumable, and the atomic publication of the output folder.

Layout, beside the output folder ``OUT``::

    .OUT.lock                  # held while a run writes OUT
    .OUT.work/<fingerprint>/   # step-0/, step-1/ ... checkpoints, baseline.json, run.log
    .OUT.tmp-<pid>/            # the output being assembled, renamed to OUT at the end
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from llmslim import __version__
from llmslim.errors import OutputError

__all__ = ["OutputLock", "WorkDir", "fingerprint", "model_identity", "publish", "sha256_json"]


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(path: Path) -> dict:
    """Cheap identity of a model folder: its files' names, sizes and mtimes."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file())
    return {"path": str(path), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def fingerprint(recipe_plain: dict, model_id: dict, data_digests: dict) -> str:
    """What determines a run's result: steps and their inputs, and llmslim's version."""
    keys = ("model", "dtype", "seed", "calibration", "steps", "trust_remote_code")
    return sha256_json({
        "recipe": {k: recipe_plain.get(k) for k in keys},
        "model": model_id,
        "data": data_digests,
        "llmslim": __version__,
    })


class OutputLock:
    """An exclusive, non-blocking lock on an output folder (released on exit or crash)."""

    def __init__(self, output: Path):
        self.path = output.parent / f".{output.name}.lock"
        self._fh = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise OutputError(f"{self.path.parent / self.path.name[1:-5]} is being written by {holder}; "
                              "wait for it to finish") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"llmslim pid {os.getpid()}")
        self._fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


class WorkDir:
    """Per-fingerprint state of a run: completed steps and the cached baseline."""

    def __init__(self, output: Path, fp: str):
        self.root = output.parent / f".{output.name}.work"
        self.path = self.root / fp[:16]

    def create(self) -> WorkDir:
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.root.iterdir():
            if stale != self.path and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)  # another fingerprint's state is useless now
        return self

    def step_dir(self, index: int) -> Path:
        return self.path / f"step-{index}"

    def record_path(self, index: int) -> Path:
        return self.path / f"step-{index}.json"

    def last_completed(self, count: int) -> int:
        """Index of the last step whose checkpoint and record are complete, or -1."""
        last = -1
        for i in range(count):
            if self.record_path(i).is_file() and self.step_dir(i).is_dir():
                last = i
            else:
                break
        return last

    def read_json(self, name: str):
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def staging_dir(output: Path) -> Path:
    path = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish(staged: Path, output: Path) -> None:
    """Replace ``output`` by the fully written ``staged`` folder with renames only."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
    os.replace(staged, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
