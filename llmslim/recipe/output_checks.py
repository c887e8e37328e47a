"""Where a recipe may write: the output may never be, contain or lie inside
anything the recipe reads."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from llmslim.recipe.schema import Recipe

__all__ = ["check_output_path"]


def check_output_path(recipe: Recipe, recipe_dir: Path, add: Callable) -> None:
    """Refuse outputs that would overwrite or delete the user's inputs."""
