"""Where a recipe may write: the output may never be, contain or lie inside
anything the recipe reads, nor be or contain the recipe's own folder; the
same holds for ``memory.offload_folder``, which also keeps clear of the output.

Paths are compared after resolving symbolic links, so a link to the model
folder is the model folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from llmslim.data import parse_dataset
from llmslim.recipe.schema import Recipe
from llmslim.recipe.steps import step_inputs

__all__ = ["check_output_path", "protected_inputs"]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def protected_inputs(recipe: Recipe, recipe_dir: Path) -> list[tuple[str, Path, bool]]:
    """(what, resolved path, is a folder whose inside is protected) for everything the recipe reads."""
    found: list[tuple[str, Path, bool]] = [("the recipe's folder", Path(recipe_dir).resolve(), False)]
    model = Path(recipe.model)
    if model.is_absolute():
        found.append(("the input model", model.resolve(), model.suffix != ".gguf"))
    specs = [("the calibration dataset", recipe.calibration.dataset if recipe.calibration else None)]
    if recipe.evaluate.perplexity is not None:
        specs.append(("the evaluation dataset", recipe.evaluate.perplexity.dataset))
    for i, step in enumerate(recipe.steps):
        datasets, teachers = step_inputs(step)
        specs += [(f"the dataset of step {i + 1}", spec) for spec in datasets]
        found += [(f"the teacher of step {i + 1}", Path(t).resolve(), True) for t in teachers if Path(t).is_absolute()]
    for what, spec in specs:
        if spec:
            ds = parse_dataset(spec)
            if ds.path is not None:
                found.append((what, ds.path.resolve(), False))
    return found


def _writable_problem(output: Path) -> str | None:
    if output.exists() and not output.is_dir():
        return f"{output} exists and is not a folder"
    probe = output.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot create {output}: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot write into {probe} (permission denied); choose an output where you can write"
    return None


def _placement_problems(target: Path, name: str, targets: list[tuple[str, Path, bool]],
                        advice: tuple[str, str]) -> list[str]:
    """Why ``target`` (the output, the offload folder: both written and replaced by a run) may not be
    where it is: the filesystem root, one of ``targets`` (what, path, is a folder), holding one, inside
    one, or not writable. ``advice``: what to do when it is or holds one, and when it lies inside one."""
    if target == Path(target.anchor):
        return [f"the {name} cannot be the root of the filesystem"]
    out = []
    for what, path, folder in targets:
        if target == path:
            out.append(f"{target} is {what}; {advice[0]}")
        elif target in path.parents:
            out.append(f"{target} contains {what} ({path}); {advice[0]}")
        elif folder and _inside(target, path):
            out.append(f"{target} lies inside {what} ({path}); {advice[1]}")
    writable = _writable_problem(target)
    return out + ([writable.replace("an output", f"an {name}")] if writable else [])


def check_output_path(recipe: Recipe, recipe_dir: Path, add: Callable) -> None:
    """Refuse outputs that would overwrite or delete the user's inputs, or that cannot be written; the
    same for the offload folder, which may not be, hold or lie inside what the recipe reads, nor the output."""
    output = Path(recipe.output).resolve()
    inputs = protected_inputs(recipe, recipe_dir)
    for problem in _placement_problems(output, "output", inputs, ("llmslim would replace it: choose another "
                                                                  "output", "write the output elsewhere")):
        add(("output",), problem)
    if recipe.memory.offload_folder is None or output == Path(output.anchor):
        return
    offload = Path(recipe.memory.offload_folder).resolve()
    for problem in _placement_problems(offload, "offload folder", inputs + [("the output", output, True)],
                                       ("choose another offload folder",) * 2):
        add(("memory", "offload_folder"), problem)
