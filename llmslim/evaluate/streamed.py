"""Perplexity of a model that does not fit the device, computed layer by layer.

All evaluation windows go through decoder layer ``i`` before layer ``i + 1``
is loaded (:class:`llmslim.streaming.LazyModel`), so one layer's weights are
materialised at a time; the windows' hidden states stay on the device or on
the host (the memory plan decides). Each layer's arguments (masks, rotary
tables) are captured once from the model's own forward, as in calibration, and
the final norm and head are applied by replaying the model's forward with its
layers passed through and the last one returning the stored hidden states, so
the logits come from the model's own code (softcapping, OPT's projection...)
and the loss is :func:`llmslim.evaluate.perplexity.window_nll`'s: the number
equals the in-memory path's.

Latency and energy need the whole model resident: a streamed evaluation skips
them and says why (``Metrics.latency_unavailable_reason``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from llmslim.calibration import _layers_pass_through, capture_layer_inputs, run_layer
from llmslim.evaluate import build_metrics, kernel_summary, linear_kernels, perplexity_values
from llmslim.evaluate.memory import PeakMemory
from llmslim.evaluate.perplexity import window_nll
from llmslim.recipe.schema import EvaluateConfig
from llmslim.report import Metrics

__all__ = ["streamed_mean_nll", "evaluate_streamed"]


@contextmanager
def _replay(layers, final: list[torch.Tensor]) -> Iterator[list[int]]:
    """The model's forward with its layers passed through and the last one returning ``final[batch]``;
    the yielded one-item list holds the batch index to return."""
    batch = [0]
    handle = layers[len(layers) - 1].register_forward_hook(lambda _m, _a, _out: final[batch[0]])
    try:
        with _layers_pass_through(layers):
            yield batch
    finally:
        handle.remove()


@torch.no_grad()
def streamed_mean_nll(lazy, windows: torch.Tensor, *, device: torch.device, batch_size: int = 1,
                      activations: torch.device | None = None, progress=None,
                      kernels: set[tuple[str, str]] | None = None) -> float:
    """Mean next-token negative log-likelihood over ``windows`` ([n, seqlen]) of the streamed model
    ``lazy``, one decoder layer at a time; ``activations`` is where the hidden states are kept
    (default: ``device``). ``kernels`` receives the (kernel, dtype) of every packed linear that ran."""
    device = torch.device(device)
    store = device if activations is None else torch.device(activations)
    layers = lazy.layers
    lazy.load_outer(device)
    try:
        captured = capture_layer_inputs(lazy.model, layers, windows, store, batch_size)
        hidden = captured.hidden
        indices = range(len(layers))
        for index in progress.track(indices, "perplexity: layers") if progress else indices:
            layer = lazy.load_layer(index, device)
            hidden = run_layer(layer, captured.layer(index, hidden, None if store == device else device))
            if kernels is not None:
                kernels |= linear_kernels(layer)
            lazy.release_layer(index)
        del captured
        total_nll, total_tokens = 0.0, 0
        with _replay(layers, hidden) as batch:
            for number, start in enumerate(range(0, windows.shape[0], batch_size)):
                batch[0] = number
                hidden[number] = hidden[number].to(device)
                nll, tokens = window_nll(lazy.model, windows[start : start + batch_size].to(device))
                hidden[number] = None  # each batch's final states are used once
                total_nll += nll.item()
                total_tokens += tokens
    finally:
        lazy.release_outer()
    return total_nll / total_tokens


def evaluate_streamed(lazy, cfg: EvaluateConfig, *, size_bytes: int, windows, device: torch.device,
                      activations: torch.device | None = None, reason: str, progress=None) -> Metrics:
    """:func:`llmslim.evaluate.evaluate_model` for a streamed model: perplexity layer by layer; latency
    and energy skipped with ``reason`` (why the model is not resident) when the recipe asks for them."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # as a resident model's parameters say
    params = lazy.parameters_count()
    values, reasons, kernels = {}, {}, set()
    with PeakMemory(device) as peak:
        if windows is not None:
            data, settings = windows
            batch = cfg.perplexity.batch_size if cfg.perplexity else 1
            loss = streamed_mean_nll(lazy, data, device=device, batch_size=batch, activations=activations,
                                     progress=progress, kernels=kernels)
            values, reasons = perplexity_values(loss, settings)
    if cfg.latency is not None:
        values["latency_unavailable_reason"] = f"latency and energy need the model resident: {reason}"
        values["energy_unavailable_reason"] = "latency was not measured (streamed evaluation)"
    return build_metrics(values, reasons, parameters=params, size_bytes=size_bytes, peak_bytes=peak.peak_bytes,
                         device=device, dtype=lazy.model.dtype, linear_kernel=kernel_summary(kernels))
