"""The evaluation block: the same measurements for the baseline and the result."""

from __future__ import annotations

from pathlib import Path

import torch

from llmslim.data import load_documents, parse_dataset
from llmslim.evaluate.energy import EnergyMeter, open_energy_meter
from llmslim.evaluate.latency import LatencyResult, measure_latency, measure_latency_pair
from llmslim.evaluate.memory import PeakMemory
from llmslim.evaluate.perplexity import eval_windows, mean_nll, tokenize_text
from llmslim.evaluate.validity import LATENCY_KEYS, perplexity_reason, rate_reason, safe_exp, split_finite
from llmslim.modeling import count_parameters
from llmslim.recipe.schema import EvaluateConfig
from llmslim.report import LatencySettings, Metrics, PerplexitySettings

__all__ = ["evaluate_model", "prepare_eval_windows", "remeasure_latency", "with_latency"]


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


def linear_kernels(model) -> set[tuple[str, str]]:
    """(kernel, activation dtype) of each quantized linear under ``model``, as it ran last."""
    return {(m.kernel, str(getattr(m, "activation_dtype", "")).removeprefix("torch."))
            for m in model.modules() if hasattr(m, "kernel") and hasattr(m, "qweight")}


def kernel_summary(kernels: set[tuple[str, str]]) -> str | None:
    """The paths the quantized linears took (``int4pack``, ``int4pack+pad``, ``int8pack``, ``dequant``)
    and the activation dtype they computed in, e.g. ``dequant,int4pack+pad (bfloat16 activations)``."""
    if not kernels:
        return None
    names = ",".join(sorted({k for k, _ in kernels}))
    dtypes = sorted({d for _, d in kernels} - {""})
    return f"{names} ({'/'.join(dtypes)} activations)" if dtypes else names


def _linear_kernel(model) -> str | None:
    return kernel_summary(linear_kernels(model))


def _latency_fields(lat: LatencyResult | None, cfg: EvaluateConfig, meter: EnergyMeter | None) -> dict:
    """The Metrics fields one latency measurement fills (none when latency is off)."""
    if lat is None or cfg.latency is None:
        return {}
    values = {**vars(lat), "latency_settings": LatencySettings(**cfg.latency.model_dump())}
    if meter is not None:
        values["energy_source"] = meter.source
        values["energy_unavailable_reason"] = meter.reason
    else:
        values["energy_source"] = None
        values["energy_unavailable_reason"] = "disabled by evaluate.energy: false"
    return values


def _rate_reasons(lat: LatencyResult | None) -> dict[str, str]:
    if lat is None:
        return {}
    return {k: rate_reason(k, v) for k, v in vars(lat).items() if k != "energy_j_per_token"}


def evaluate_model(model, cfg: EvaluateConfig, *, size_bytes: int, windows=None, seed: int = 0,
                   progress=None) -> Metrics:
    """Measure ``model`` as it runs now; ``size_bytes`` is its weights on disk.

    A value that is not a finite number is returned as None, with the reason in
    ``Metrics.invalid`` (the caller fails the run on it)."""
    device = next(model.parameters()).device
    params = count_parameters(model)
    values, reasons, lat = {}, {}, None
    meter = open_energy_meter(device) if (cfg.latency is not None and cfg.energy) else None
    with PeakMemory(device) as peak:
        if windows is not None:
            data, settings = windows
            batch = cfg.perplexity.batch_size if cfg.perplexity else 1
            values, reasons = perplexity_values(mean_nll(model, data, batch_size=batch, progress=progress),
                                                settings)
        if cfg.latency is not None:
            if progress:
                progress.log("measuring latency")
            lat = measure_latency(model, cfg.latency, seed=seed, meter=meter)
    values.update(_latency_fields(lat, cfg, meter))
    return build_metrics(values, {**reasons, **_rate_reasons(lat)}, parameters=params, size_bytes=size_bytes,
                         peak_bytes=peak.peak_bytes, device=device, dtype=next(model.parameters()).dtype,
                         linear_kernel=_linear_kernel(model))


def perplexity_values(loss: float, settings) -> tuple[dict, dict]:
    """The perplexity fields of ``Metrics`` from a mean next-token loss, and why it is invalid if it is."""
    return ({"perplexity": safe_exp(loss), "perplexity_settings": settings},
            {"perplexity": perplexity_reason(loss)})


def build_metrics(values: dict, reasons: dict, *, parameters: int, size_bytes: int, peak_bytes: int,
                  device: torch.device, dtype: torch.dtype, linear_kernel: str | None) -> Metrics:
    """``Metrics`` from the measured ``values``; non-finite ones become null with their ``reasons``."""
    values, invalid = split_finite(values, reasons)
    return Metrics(parameters=parameters, size_bytes=size_bytes, bits_per_parameter=8.0 * size_bytes / parameters,
                   peak_memory_bytes=peak_bytes, device=str(device), dtype=str(dtype).removeprefix("torch."),
                   linear_kernel=linear_kernel, invalid=invalid, **values)


def remeasure_latency(baseline_model, result_model, cfg: EvaluateConfig, seed: int) -> tuple[dict, dict]:
    """Time the baseline and the result alternately in this process (same prompt).

    Returns the latency fields of ``Metrics`` for the baseline and for the result
    (tokens/s, p90, spreads, energy, settings, ``latency_interleaved_with`` and
    the ``invalid`` entries of these fields); empty dicts when latency is off.
    Apply them with :func:`with_latency`, which keeps the other invalid entries."""
    if cfg.latency is None:
        return {}, {}
    models = {"baseline": baseline_model, "result": result_model}
    meters = {name: open_energy_meter(next(m.parameters()).device) if cfg.energy else None
              for name, m in models.items()}
    lats = measure_latency_pair(models, cfg.latency, seed=seed, meters=meters)
    out = []
    for name, other in (("baseline", "result"), ("result", "baseline")):
        values, invalid = split_finite(_latency_fields(lats[name], cfg, meters[name]), _rate_reasons(lats[name]))
        out.append({**values, "latency_interleaved_with": other, "invalid": invalid})
    return out[0], out[1]


def with_latency(metrics: Metrics, update: dict) -> Metrics:
    """``metrics`` with the latency fields from :func:`remeasure_latency`, validated; the
    ``invalid`` entries of the latency fields are replaced, the others kept."""
    if not update:
        return metrics
    kept = {k: v for k, v in metrics.invalid.items() if k not in LATENCY_KEYS}
    data = {**metrics.model_dump(), **update, "invalid": {**kept, **update.get("invalid", {})}}
    return Metrics.model_validate(data)


def model_size_bytes(model, path: Path | None, tensor_bytes: int | None = None) -> int:
    """Weights as saved: the safetensors files when the model's dtype matches them,
    else the bytes of its unique tensors (what save_pretrained would write; ``tensor_bytes``
    when given, e.g. counted from a streamed model's skeleton)."""
    from llmslim.modeling import weights_size_bytes

    tensor_bytes = _tensor_bytes(model) if tensor_bytes is None else tensor_bytes
    if path is not None and Path(path).is_dir():
        on_disk = weights_size_bytes(Path(path))
        if on_disk and abs(on_disk - tensor_bytes) <= 0.01 * tensor_bytes + 1_000_000:
            return on_disk
    return tensor_bytes


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
