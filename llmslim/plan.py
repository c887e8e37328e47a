"""``--dry-run``: what a recipe would do and roughly how much memory it needs,
from the model's config alone: no weight file is opened and the network is
never used (a hub id is looked up in the local Hugging Face cache only)."""

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


def _local_config(model_ref: str, trust_remote_code: bool):
    """The model's config from local files only (never the network), and a note when the weights are not local."""
    from transformers import AutoConfig

    from llmslim.gguf import gguf_config, is_gguf_ref
    from llmslim.modeling import PICKLE_SUFFIXES, local_model_path

    if is_gguf_ref(model_ref):  # the GGUF header only: nothing is converted for a plan
        return gguf_config(model_ref, trust_remote_code=trust_remote_code), ""
    folder = local_model_path(model_ref)
    if folder is None:
        return None, f"weights not local; config not available (download with `hf download {model_ref}`); "
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    local = any(p.name.endswith((".safetensors",) + PICKLE_SUFFIXES) for p in folder.iterdir())
    return config, "" if local else f"weights not yet local (download with `hf download {model_ref}`); "


def _count_parameters(model_ref: str, trust_remote_code: bool) -> tuple[int | None, str, int, str]:
    """Parameters of the model built on the meta device, its stored dtype, its width, and a locality note."""
    import torch
    from transformers import AutoModelForCausalLM

    config, note = _local_config(model_ref, trust_remote_code)
    if config is None:
        return None, "float32", 0, note
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a GPTQ checkpoint: counted as its dense architecture
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    from llmslim.families import hidden_size

    hidden = hidden_size(config.to_dict()) or 0
    return count, dtype, hidden, note


def plan_recipe(recipe: Recipe) -> Plan:
    params, stored, hidden, local_note = _count_parameters(recipe.model, recipe.trust_remote_code)
    dtype = stored if recipe.dtype == "auto" else recipe.dtype
    weights = params * BYTES.get(dtype, 4) if params else None
    calib = 0
    if recipe.calibration is not None:
        # layer inputs and outputs of every calibration window, in float32
        calib = 2 * recipe.calibration.samples * recipe.calibration.seqlen * hidden * 4
    peak = None if weights is None else int(weights * 1.2 + calib)
    note = local_note + "estimate: weights x1.2 (activations, one layer's workspace) + calibration activations"
    if params and any(s.STEP_NAME == "distill" for s in recipe.steps):
        # the teacher, plus a float32 student with its gradients and two AdamW moments
        peak = max(peak, int(weights * 2 + params * 4 * 4))
        note += "; distill: teacher + fp32 student, gradients and AdamW state (activations not counted)"
    return Plan(name=recipe.name, model=recipe.model, output=recipe.output,
                steps=[s.describe() for s in recipe.steps], parameters=params, weights_bytes=weights,
                calibration_bytes=calib, estimated_peak_bytes=peak, note=note)
