"""``--dry-run``: what a recipe would do and roughly how much memory it needs,
from the model's config alone (no weights are loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from llmslim.recipe.schema import Recipe

__all__ = ["Plan", "plan_recipe"]

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    name: str
    model: str
    output: str
    steps: list[str]
    parameters: int | None
    weights_bytes: int | None
    calibration_bytes: int
    estimated_peak_bytes: int | None
    note: str = ""


def _count_parameters(model_ref: str, trust_remote_code: bool) -> tuple[int | None, str, str]:
    """Parameters of the model built on the meta device, and its stored dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmslim.modeling import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_ref), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return count, dtype, hidden


def plan_recipe(recipe: Recipe) -> Plan:
    params, stored, hidden = _count_parameters(recipe.model, recipe.trust_remote_code)
    dtype = stored if recipe.dtype == "auto" else recipe.dtype
    weights = params * BYTES.get(dtype, 4) if params else None
    calib = 0
    if recipe.calibration is not None:
        # layer inputs and outputs of every calibration window, in float32
        calib = 2 * recipe.calibration.samples * recipe.calibration.seqlen * hidden * 4
    peak = None if weights is None else int(weights * 1.2 + calib)
    note = "estimate: weights x1.2 (activations, one layer's workspace) + calibration activations"
    if params and any(s.STEP_NAME == "distill" for s in recipe.steps):
        # the teacher, plus a float32 student with its gradients and two AdamW moments
        peak = max(peak, int(weights * 2 + params * 4 * 4))
        note += "; distill: teacher + fp32 student, gradients and AdamW state (activations not counted)"
    return Plan(name=recipe.name, model=recipe.model, output=recipe.output,
                steps=[s.describe() for s in recipe.steps], parameters=params, weights_bytes=weights,
                calibration_bytes=calib, estimated_peak_bytes=peak, note=note)
