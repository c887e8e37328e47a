"""Checks of quantization steps against the model's layer widths (config.json).

A group size that does not divide a width is valid (the last group of that
layer is partial, the standard GPTQ layout), and so is one larger than a
width (that layer gets one group of all its columns, i.e. per channel). What
remains is which loaders can run the result: where a loader the step names
in ``loaders`` cannot, that is a recipe problem; where a common loader the
user did not name cannot, a note is logged (a warning, not an error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, get_args

from llmslim.progress import LOGGER
from llmslim.recipe.awq_config import check_awq_steps
from llmslim.recipe.schema import Recipe
from llmslim.recipe.steps import GPTQ_LOADERS

__all__ = ["check_quant_targets", "LayerWidths", "loader_problems", "LOADERS"]

LOADERS = get_args(GPTQ_LOADERS)   # the names a step's `loaders` accepts
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_K, MARLIN_MIN_N = 128, 64     # vLLM's GPTQ_MARLIN_MIN_THREAD_K / _N
VLLM_CPU_MULTIPLE = 32


@dataclass(frozen=True)
class LayerWidths:
    """The input and output widths of a model's decoder linears."""

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def _partial(widths, group_size: int) -> list[int]:
    return sorted({k for k in widths if group_size != -1 and k % group_size})


def loader_problems(loader: str, *, bits: int, group_size: int, sym: bool, widths: LayerWidths) -> list[str]:
    """Why ``loader`` cannot run a GPTQ checkpoint of these settings and widths (empty when it can)."""
    partial = _partial(widths.inputs, group_size)
    if loader == "llmslim":
        return []
    if loader == "transformers":
        why = []
        if partial:
            why.append(f"input widths {partial} are not multiples of group_size {group_size} (partial last "
                       "group): gptqmodel's default CPU/CUDA kernels refuse them; load with "
                       "GPTQConfig(bits=..., backend=\"gptq_torch\")")
        odd3 = sorted({k for k in widths.inputs if k % 32}) if bits == 3 else []
        if odd3:
            why.append(f"3-bit input widths {odd3} are not multiples of 32: gptqmodel's 3-bit unpacker "
                       "needs whole 32-value runs")
        return why
    if loader == "vllm-marlin":
        why = []
        if bits not in (4, 8) or not sym:
            why.append(f"Marlin takes 4 or 8 bits, symmetric only (got {bits} bits, sym={sym})")
        if group_size not in MARLIN_GROUP_SIZES:
            why.append(f"Marlin group sizes are {MARLIN_GROUP_SIZES}, not {group_size}")
        if partial:
            why.append(f"Marlin needs every input width to be a multiple of the group size ({partial} "
                       f"are not multiples of {group_size})")
        small_k = sorted({k for k in widths.inputs if k % MARLIN_MIN_K})
        small_n = sorted({n for n in widths.outputs if n % MARLIN_MIN_N})
        if small_k or small_n:
            why.append(f"Marlin needs input widths multiple of {MARLIN_MIN_K} and output widths multiple of "
                       f"{MARLIN_MIN_N} (not: inputs {small_k}, outputs {small_n})")
        return why
    if loader == "vllm-cpu":
        why = [] if bits == 4 and sym else [f"vLLM CPU takes 4-bit symmetric only (got {bits} bits, sym={sym})"]
        odd = sorted({w for w in (*widths.inputs, *widths.outputs) if w % VLLM_CPU_MULTIPLE})
        if odd:
            why.append(f"vLLM CPU needs widths multiple of {VLLM_CPU_MULTIPLE} (not: {odd})")
        if partial:
            why.append(f"input widths {partial} have a partial last group, which vLLM CPU is not known to take")
        return why
    raise ValueError(f"unknown loader {loader!r}; known: {', '.join(LOADERS)}")


def _widths(model: str) -> LayerWidths | None:
    """The widths of a local model's decoder linears from its config.json (None when unknown)."""
    config_file = Path(model) / "config.json"
    if not Path(model).is_absolute() or not config_file.is_file():
        return None
    try:
        from llmslim.prune.families import model_shape

        shape = model_shape(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unsupported or unreadable config is reported elsewhere, or when the model loads
    inputs, outputs = shape.linear_widths()  # fused projections (Phi-3, GPT-2) as the one linear they are
    return LayerWidths(inputs=inputs, outputs=outputs)


def check_quant_targets(recipe: Recipe, add: Callable) -> None:
    """Problems or notes about group sizes and loaders, from the widths in config.json.

    Only steps of a packed checkpoint (``format: gptq``) before which no
    ``prune`` step changes the widths are checked here; the others are
    quantized at whatever widths they meet.
    """
    check_awq_steps(recipe, add, lambda text: LOGGER.warning("note: %s", text))
    widths = _widths(recipe.model)
    if widths is None:
        return
    for i, step in enumerate(recipe.steps):
        if step.STEP_NAME == "prune":
            return
        if getattr(step, "format", None) != "gptq":  # the steps that can pack: gptq, rtn, awq, signround
            continue
        named = tuple(step.loaders)
        partial = _partial(widths.inputs, step.group_size)
        for loader in LOADERS:
            why = loader_problems(loader, bits=step.bits, group_size=step.group_size, sym=step.sym, widths=widths)
            if why and loader in named:
                add(("steps", i, step.STEP_NAME, "loaders"), f"{loader} cannot load the result: {'; '.join(why)}")
            elif why and partial:   # notes only where the widths make a partial group

                LOGGER.warning("note: steps[%d].%s (bits %d, group_size %d): %s cannot load the result as "
                               "is: %s", i, step.STEP_NAME, step.bits, step.group_size, loader, "; ".join(why))
