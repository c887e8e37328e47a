"""What a run records about where it ran and what it read, and the
side-by-side latency of the original and the result."""

from __future__ import annotations

from collections.abc import Callable
import torch

from llmslim.evaluate import evaluate_model, model_size_bytes, remeasure_latency, with_latency
from llmslim.evaluate.environment import environment_info
from llmslim.progress import LOGGER
from llmslim.report import Environment, Metrics
from llmslim.recipe.schema import Recipe

__all__ = ["environment", "evaluate_result", "source_info"]


def environment(device: torch.device, model_ref: str) -> Environment:
    """The report's environment; it names the file the model was converted from, if any."""
    env = environment_info(device)
    source = source_info(model_ref)
    return env.model_copy(update={"model_source": source}) if source else env


def source_info(model_ref: str) -> dict | None:
    """What the input model was converted from (a GGUF file), or None for an HF folder or hub id."""
    from llmslim.gguf import gguf_source_info, is_gguf_ref

    return gguf_source_info(model_ref) if is_gguf_ref(model_ref) else None


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def evaluate_result(recipe: Recipe, device: torch.device, load_original: Callable[[], torch.nn.Module], model,
                    baseline: Metrics, *, size_bytes: int, windows, progress=None) -> tuple[Metrics, Metrics]:
    """(baseline, result) after measuring the result. When the original fits beside the result, both are
    timed alternately in this process, so that both see the same machine state, and the result is not
    also timed alone; otherwise the result is timed alone after the baseline's own timing (and says so)."""
    side_by_side = recipe.evaluate.latency is not None and \
        2 * (baseline.size_bytes + model_size_bytes(model, None)) <= _free_memory(device)
    cfg = recipe.evaluate.model_copy(update={"latency": None}) if side_by_side else recipe.evaluate
    result = evaluate_model(model, cfg, size_bytes=size_bytes, windows=windows, seed=recipe.seed,
                            progress=progress)
    if not side_by_side:
        if recipe.evaluate.latency is not None:
            LOGGER.info("%s: not enough free memory to time the original beside the result; latencies were "
                        "measured one after the other", recipe.name)
        return baseline, result
    LOGGER.info("%s: timing the original and the result alternately", recipe.name)
    original = load_original()
    b, r = remeasure_latency(original, model, recipe.evaluate, recipe.seed)
    del original
    return with_latency(baseline, b), with_latency(result, r)
