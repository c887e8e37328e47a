"""What determines a run's results, as content hashes.

Three keys, each over exactly what it depends on:

* the **steps** key (the work folder and the published checkpoint): the
  model's files, dtype, device, seed, calibration, every step's options and
  the files they read (distillation data, a teacher's files), llmslim's version;
* the **evaluation** key: the evaluate block, its data, dtype and device;
* the **baseline** key: the model's files plus the evaluation key;
* one **prefix** key per step: what the steps key covers, restricted to the
  steps up to that one (model, data, dtype, device, seed, calibration and
  every earlier step's options and data). A search keys its shared step
  checkpoints by them, so variants that share a prefix compute it once.

Budgets are in none of them: a change of budgets only re-checks the stored
metrics. Every file is hashed by content (sha256). A file is hashed once and
its hash reused while its size, modification time (ns) and inode are
unchanged, so a cron rerun of a 100 GB model stats files and hashes nothing.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from llmslim import __version__
from llmslim.data import parse_dataset
from llmslim.recipe.schema import Recipe
from llmslim.recipe.steps import step_inputs

__all__ = ["DigestCache", "RunKeys", "run_keys", "prefix_key", "sha256_json", "file_sha256"]

STEP_KEYS = ("model", "dtype", "seed", "calibration", "steps", "trust_remote_code", "allow_pickle")
CHUNK = 1 << 22


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class DigestCache:
    """Content hashes of input files, reused while a file's (size, mtime_ns, inode) is unchanged.

    ``known`` comes from the previous report's ``inputs``; ``used`` is what this
    run read, stored in its report for the next one."""

    known: dict = field(default_factory=dict)
    used: dict = field(default_factory=dict)

    def file(self, path: Path) -> str:
        path = Path(path)
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.used.get(str(path)) or self.known.get(str(path))
        if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
            digest = entry["sha256"]
        else:
            digest = file_sha256(path)
        self.used[str(path)] = {"stat": stamp, "sha256": digest}
        return digest

    def folder(self, path: Path) -> dict[str, str]:
        """name -> sha256 of every file in a model folder (subfolders included)."""
        root = Path(path)
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {p.relative_to(root).as_posix(): self.file(p) for p in files}

    def dataset(self, spec: str) -> str:
        ds = parse_dataset(spec)
        if ds.kind in ("text", "jsonl"):
            return sha256_json([ds.spec(), self.file(ds.path)])
        if ds.kind == "builtin":  # the standard library's docstrings depend on the Python version
            return sha256_json([ds.spec(), platform.python_version()])
        return sha256_json([ds.spec()])


@dataclass(frozen=True)
class RunKeys:
    steps: str
    evaluation: str
    baseline: str
    prefixes: tuple[str, ...] = ()  # prefixes[i]: the key of the model after step i


def _model_digest(ref: str, model_path: Path, cache: DigestCache) -> dict:
    if Path(model_path).is_dir():
        return {"files": cache.folder(model_path)}
    return {"ref": ref}


def _steps_data(recipe: Recipe, cache: DigestCache) -> dict:
    from llmslim.modeling import resolve_model_path

    data = {}
    for i, step in enumerate(recipe.steps):
        datasets, teachers = step_inputs(step)
        entry = {"datasets": [cache.dataset(spec) for spec in datasets],
                 "teachers": [_model_digest(t, resolve_model_path(t), cache) for t in teachers]}
        if datasets or teachers:
            data[str(i)] = entry
    return data


def run_keys(recipe: Recipe, plain: dict, model_path: Path, device: str, cache: DigestCache) -> RunKeys:
    """The three keys of a run (see the module docstring)."""
    model = _model_digest(recipe.model, model_path, cache)
    calibration = cache.dataset(recipe.calibration.dataset) if recipe.calibration else None
    steps_data = _steps_data(recipe, cache)
    basis = {"recipe": {k: plain.get(k) for k in STEP_KEYS}, "device": device, "model": model,
             "data": {"calibration": calibration, "steps": steps_data}, "llmslim": __version__}
    steps = sha256_json(basis)
    prefixes = tuple(prefix_key(basis, i) for i in range(len(recipe.steps)))
    ppl = recipe.evaluate.perplexity
    evaluation = sha256_json({
        "evaluate": plain.get("evaluate"),
        "data": cache.dataset(ppl.dataset) if ppl else None,
        "dtype": recipe.dtype,
        "device": device,
        "llmslim": __version__,
    })
    baseline = sha256_json({"model": model, "evaluation": evaluation, "trust_remote_code": recipe.trust_remote_code})
    return RunKeys(steps=steps, evaluation=evaluation, baseline=baseline, prefixes=prefixes)


def prefix_key(basis: dict, index: int) -> str:
    """The key of the model after step ``index``: ``basis`` (the steps key's input) with the steps
    and their data cut after that step; a pure function of the recipe's content."""
    recipe = dict(basis["recipe"], steps=basis["recipe"]["steps"][: index + 1])
    data = {"calibration": basis["data"]["calibration"],
            "steps": {k: v for k, v in basis["data"]["steps"].items() if int(k) <= index}}
    return sha256_json({**basis, "recipe": recipe, "data": data, "prefix": index})
