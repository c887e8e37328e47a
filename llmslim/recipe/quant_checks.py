"""Checks of quantization steps against the model's layer widths (config.json)."""

from __future__ import annotations

from typing import Callable

from llmslim.recipe.schema import Recipe

__all__ = ["check_quant_targets"]


def check_quant_targets(recipe: Recipe, add: Callable) -> None:
    """Problems or notes about group sizes and loaders, from the widths in config.json."""
