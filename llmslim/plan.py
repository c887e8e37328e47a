"""``--dry-run``: what a recipe would do and how much memory (and roughly how
long) each phase needs, from the model's config alone: no weight file is
opened and the network is never used (a hub id is looked up in the local
Hugging Face cache only). The per-phase estimate and the resident/streamed
choice are :mod:`llmslim.memory_plan`'s."""

from __future__ import annotations

from dataclasses import dataclass

from llmslim.memory_plan import MemoryPlan
from llmslim.recipe.schema import Recipe

__all__ = ["Plan", "plan_recipe", "local_config"]


@dataclass
class Plan:
    name: str
    model: str
    output: str
    steps: list[str]
    parameters: int | None
    weights_bytes: int | None
    calibration_bytes: int
    estimated_peak_bytes: int | None    # the largest device estimate over the phases
    note: str = ""
    memory: MemoryPlan | None = None
    weights_local: bool = True


def local_config(model_ref: str, trust_remote_code: bool):
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


def plan_recipe(recipe: Recipe, *, free_device_bytes: int | None = None,
                free_host_bytes: int | None = None) -> Plan:
    from llmslim.memory_estimates import calibration_activations
    from llmslim.memory_plan import plan_memory, read_model_facts

    facts, local_note = read_model_facts(recipe.model, recipe.dtype, recipe.trust_remote_code)
    memory = plan_memory(recipe, free_device_bytes=free_device_bytes, free_host_bytes=free_host_bytes,
                         facts=facts) if facts is not None else None
    calib = 0
    if facts is not None and recipe.calibration is not None:
        calib = calibration_activations(facts, recipe.calibration.samples, recipe.calibration.seqlen)
    peak = max((p.device_bytes for p in memory.phases), default=None) if memory is not None else None
    note = local_note + ("estimate per phase: weights held + that phase's working set "
                         "(calibration activations, Hessians, logits, optimizer state)")
    return Plan(name=recipe.name, model=recipe.model, output=recipe.output,
                steps=[s.describe() for s in recipe.steps],
                parameters=facts.parameters if facts else None,
                weights_bytes=facts.weight_bytes if facts else None, calibration_bytes=calib,
                estimated_peak_bytes=peak, note=note, memory=memory, weights_local=not local_note)
