"""The evaluation block: the same measurements for the baseline and the result."""

from __future__ import annotations

from pathlib import Path

import torch

from llmslim.data import load_documents, parse_dataset
from llmslim.evaluate.energy import open_energy_meter
from llmslim.evaluate.latency import measure_latency
from llmslim.evaluate.memory import PeakMemory
from llmslim.evaluate.perplexity import eval_windows, perplexity, tokenize_text
from llmslim.modeling import count_parameters
from llmslim.recipe.schema import EvaluateConfig
from llmslim.report import LatencySettings, Metrics, PerplexitySettings

__all__ = ["evaluate_model", "prepare_eval_windows"]


def prepare_eval_windows(cfg: EvaluateConfig, tokenizer) -> tuple[torch.Tensor, PerplexitySettings] | None:
    """Tokenize the perplexity set once; baseline and result share the windows."""
    if cfg.perplexity is None:
        return None
    ppl = cfg.perplexity
    ids = tokenize_text(tokenizer, load_documents(parse_dataset(ppl.dataset)))
    windows = eval_windows(ids, ppl.seqlen, ppl.max_windows)
    settings = PerplexitySettings(
        dataset=ppl.dataset, seqlen=ppl.seqlen, windows=windows.shape[0], tokens=windows.numel()
    )
    return windows, settings


def _linear_kernel(model) -> str | None:
    kernels = sorted({m.kernel for m in model.modules() if hasattr(m, "kernel") and hasattr(m, "qweight")})
    return ",".join(kernels) or None


def evaluate_model(model, cfg: EvaluateConfig, *, size_bytes: int, windows=None, seed: int = 0,
                   progress=None) -> Metrics:
    """Measure ``model`` as it runs now; ``size_bytes`` is its weights on disk."""
    device = next(model.parameters()).device
    params = count_parameters(model)
    values: dict = {}
    meter = open_energy_meter(device) if (cfg.latency is not None and cfg.energy) else None
    with PeakMemory(device) as peak:
        if windows is not None:
            data, settings = windows
            batch = cfg.perplexity.batch_size if cfg.perplexity else 1
            values["perplexity"] = perplexity(model, data, batch_size=batch, progress=progress)
            values["perplexity_settings"] = settings
        if cfg.latency is not None:
            if progress:
                progress.log("measuring latency")
            lat = measure_latency(model, cfg.latency, seed=seed, meter=meter)
            values.update(vars(lat))
            values["latency_settings"] = LatencySettings(**cfg.latency.model_dump())
    if meter is not None:
        values["energy_source"] = meter.source
        values["energy_unavailable_reason"] = meter.reason
    elif cfg.latency is not None:
        values["energy_unavailable_reason"] = "disabled by evaluate.energy: false"
    return Metrics(
        parameters=params,
        size_bytes=size_bytes,
        bits_per_parameter=8.0 * size_bytes / params,
        peak_memory_bytes=peak.peak_bytes,
        device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        linear_kernel=_linear_kernel(model),
        **values,
    )


def model_size_bytes(model, path: Path | None) -> int:
    """Weights as saved: the safetensors files when the model's dtype matches them,
    else the bytes of its unique tensors (what save_pretrained would write)."""
    from llmslim.modeling import weights_size_bytes

    if path is not None and Path(path).is_dir():
        on_disk = weights_size_bytes(Path(path))
        tensor_bytes = _tensor_bytes(model)
        if on_disk and abs(on_disk - tensor_bytes) <= 0.01 * tensor_bytes + 1_000_000:
            return on_disk
    return _tensor_bytes(model)


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
