"""Recipes: YAML files describing a compression job."""

from llmslim.recipe.loader import load_recipe
from llmslim.recipe.schema import Recipe
from llmslim.recipe.steps import STEP_CONFIGS, StepConfig

__all__ = ["load_recipe", "Recipe", "StepConfig", "STEP_CONFIGS"]
