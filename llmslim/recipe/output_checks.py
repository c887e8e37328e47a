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


def check_output_path(recipe: Recipe, recipe_dir: Path, add: Callable) -> None:
    """Refuse outputs that would overwrite or delete the user's inputs, or that cannot be written."""
    output = Path(recipe.output).resolve()
    loc = ("output",)
    if output == Path(output.anchor):
        add(loc, "the output cannot be the root of the filesystem")
        return
    for what, path, folder in protected_inputs(recipe, recipe_dir):
        if output == path:
            add(loc, f"{output} is {what}; llmslim would replace it: choose another output")
        elif output in path.parents:
            add(loc, f"{output} contains {what} ({path}); llmslim would replace it: choose another output")
        elif folder and _inside(output, path):
            add(loc, f"{output} lies inside {what} ({path}); write the output elsewhere")
    problem = _writable_problem(output)
    if problem:
        add(loc, problem)
    if recipe.memory.offload_folder is not None:
        _check_offload_folder(Path(recipe.memory.offload_folder).resolve(), output, recipe, recipe_dir, add)


def _check_offload_folder(offload: Path, output: Path, recipe: Recipe, recipe_dir: Path, add: Callable) -> None:
    """The offload folder is written and emptied by a run: it may not be, hold or lie inside what the recipe
    reads, nor the output (which a run replaces)."""
    loc = ("memory", "offload_folder")
    if offload == Path(offload.anchor):
        add(loc, "the offload folder cannot be the root of the filesystem")
        return
    targets = protected_inputs(recipe, recipe_dir) + [("the output", output, True)]
    for what, path, folder in targets:
        if offload == path:
            add(loc, f"{offload} is {what}; choose another offload folder")
        elif offload in path.parents:
            add(loc, f"{offload} contains {what} ({path}); choose another offload folder")
        elif folder and _inside(offload, path):
            add(loc, f"{offload} lies inside {what} ({path}); choose another offload folder")
    problem = _writable_problem(offload)
    if problem:
        add(loc, problem.replace("an output", "an offload folder"))
