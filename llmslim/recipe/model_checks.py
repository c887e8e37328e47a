"""Checks of a recipe against the model it names, from config.json and the
weight files' headers only (no weights are loaded)."""

from __future__ import annotations

from typing import Callable

from llmslim.recipe.schema import Recipe

__all__ = ["check_model_inputs"]


def check_model_inputs(recipe: Recipe, add: Callable) -> None:
    """Problems ``run`` would hit when loading the model, found before loading it."""
