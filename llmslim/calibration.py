"""The layer-by-layer calibration loop, written once and shared by every
calibrated step (GPTQ, pruning).

1. Capture what every decoder layer is called with, for all calibration
   windows: the first layer's hidden states, and each layer's own arguments
   (attention mask, rotary embeddings, positions). Families differ per layer:
   Gemma 2/3 alternate sliding-window and full attention with different masks
   (and, Gemma 3, different rotary bases), Qwen2/Qwen3 and Mistral can have
   sliding windows on some layers. The model's own forward computes them, once
   per batch, with every decoder layer made a pass-through, so each layer's
   arguments are exactly those of an unmodified forward and cost no layer work.
2. For each decoder layer: move it to the compute device; for each group of
   its linear layers (``true_sequential``: linears fed by the same tensor form
   a group, in execution order), run the calibration inputs through the layer
   with hooks that hand each linear's input to the compressor, then let the
   compressor compress the group; finally rerun the compressed layer to get
   the next layer's inputs, and move the layer back. A :class:`LayerSource`
   may supply the layers instead (a streamed model reads each one from its
   checkpoint and writes it out when done, :mod:`llmslim.streaming`), and the
   captured inputs may be kept on the host, moved per call.

A :class:`LayerCompressor` decides what to collect and how to compress, so the
loop knows nothing about GPTQ or pruning. Steps that compress a whole decoder
layer at once (``signround``) plug a per-layer function into the same loop,
:func:`layerwise`, which :func:`sequential_calibrate` is built on.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from llmslim.modeling import decoder_layers, find_linears, layer_prefix
from llmslim.progress import Progress

__all__ = ["LayerCompressor", "GroupCompressor", "LayerInputs", "CapturedInputs", "capture_layer_inputs",
           "sequential_calibrate", "layerwise", "LayerFn", "run_layer", "LayerSource", "ResidentLayers",
           "linear_groups", "LayerObserver", "PhaseTimes", "compress_layer"]

# Keyword arguments that carry a KV cache: calibration runs each layer alone, without one.
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


class LayerCompressor(Protocol):
    """What a calibrated step plugs into the loop."""

    def select(self, layer_index: int, linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The linears of this layer to calibrate (may drop some)."""

    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """See one batch of inputs ``x`` [..., in_features] of ``module``."""

    def compress(self, layer_index: int, name: str, module: nn.Module) -> dict[str, Any]:
        """Compress ``module`` from what was collected; return its statistics."""


class GroupCompressor(Protocol):
    """A compressor that compresses each group of linears (those reading one tensor) together,
    defining ``compress_group`` instead of ``compress`` (AWQ: one scale search per group and a
    fold into the op before it); the loop calls it when it is defined."""

    def compress_group(self, layer_index: int, layer_name: str, layer: nn.Module,
                       group: dict[str, nn.Module]) -> list[dict[str, Any]]:
        """Compress the group's linears (by full name) of ``layer`` (named ``layer_name`` in the
        model); return one statistics row per linear, each with its ``module`` name."""


LayerObserver = Callable[[int, list[torch.Tensor], list[torch.Tensor]], None]


@dataclass
class LayerInputs:
    """What one decoder layer is called with, one entry per calibration batch."""

    hidden: list[torch.Tensor]
    args: list[tuple]  # positional arguments after the hidden states
    kwargs: list[dict[str, Any]]
    device: torch.device | None = None  # set when the inputs are kept elsewhere (the host): moved per call

    def call(self, layer: nn.Module, batch: int):
        hidden, args, kwargs = self.hidden[batch], self.args[batch], self.kwargs[batch]
        if self.device is not None:
            memo: dict[int, Any] = {}
            hidden, args, kwargs = _to(hidden, self.device, memo), _to(args, self.device, memo), \
                _to(kwargs, self.device, memo)
        return layer(hidden, *args, **kwargs)


@dataclass
class CapturedInputs:
    """The first layer's hidden states per batch, and every layer's other arguments per batch."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict[str, Any]]]]  # [layer][batch] -> (args, kwargs)

    def layer(self, index: int, hidden: list[torch.Tensor] | None = None,
              device: torch.device | None = None) -> LayerInputs:
        """Layer ``index``'s inputs, with ``hidden`` (default: the first layer's) as its hidden states;
        ``device``: where each batch is moved for a call, when they are kept elsewhere."""
        calls = self.calls[index]
        return LayerInputs(self.hidden if hidden is None else hidden, [a for a, _ in calls], [k for _, k in calls],
                           device)


class LayerSource(Protocol):
    """Where the loop gets each decoder layer from, and what happens to it once it is done."""

    def load(self, index: int) -> nn.Module:
        """Layer ``index``, on the compute device."""

    def done(self, index: int, layer: nn.Module) -> None:
        """Layer ``index`` is compressed and rerun."""


class ResidentLayers:
    """The model's own layers: moved to ``device`` while worked on, then back where they were."""

    def __init__(self, layers: nn.ModuleList, device: torch.device):
        self.layers, self.device, self.home = layers, device, device

    def load(self, index: int) -> nn.Module:
        self.home = next(self.layers[index].parameters()).device
        return self.layers[index].to(self.device)

    def done(self, index: int, layer: nn.Module) -> None:
        layer.to(self.home)


class PhaseTimes:
    """Wall seconds of the loop's phases: where calibration time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        """Rounded seconds per phase; ``forward`` excludes the time spent in ``collect``."""
        out = dict(self.seconds)
        if "group_passes" in out:
            out["forward"] = out.pop("group_passes") - out.get("collect", 0.0)
        return {k: round(v, 3) for k, v in out.items()}


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what it needs is seen (the last
    layer's arguments, or the inputs of a group's linears): the rest would be wasted work."""


def _to(value, device, memo: dict[int, Any]):
    """``value`` on ``device``; a tensor shared by several layers (a mask, rotary tables) is moved once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.detach().to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


def _layer_call(args: tuple, kwargs: dict, device, memo: dict[int, Any]) -> tuple[tuple, dict[str, Any]]:
    """A layer's arguments after the hidden states, on ``device``, without a cache."""
    rest = {k: _to(v, device, memo) for k, v in kwargs.items() if k != "hidden_states" and k not in CACHE_KWARGS}
    rest["use_cache"] = False
    return _to(tuple(args[1:]) if args else (), device, memo), rest


def _pass_through(hidden_states, *_args, **_kwargs):
    return hidden_states


@contextmanager
def _layers_pass_through(layers: nn.ModuleList) -> Iterator[None]:
    """Every decoder layer returns its hidden states unchanged (hooks still run)."""
    own = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's wrapped forward
    for layer in layers:
        layer.forward = _pass_through
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@torch.no_grad()
def capture_layer_inputs(model, layers: nn.ModuleList, windows: torch.Tensor, device: torch.device,
                         batch_size: int) -> CapturedInputs:
    """One model forward per batch, layers passed through: the first layer's hidden states and
    every layer's own arguments, as the model computes them for that layer."""
    captured = CapturedInputs([], [[] for _ in layers])
    memo: dict[int, Any] = {}
    last = len(layers) - 1

    def grab(index: int):
        def hook(_module, args, kwargs):
            if index == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                captured.hidden.append(hidden.detach().to(device))
            captured.calls[index].append(_layer_call(args, kwargs, device, memo))
            if index == last:
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with _layers_pass_through(layers):
            for start in range(0, windows.shape[0], batch_size):
                memo.clear()
                batch = windows[start : start + batch_size].to(_model_device(model))
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """The layer's output for each batch, kept where the batch's inputs are kept."""
    return [_first(inputs.call(layer, b)).to(inputs.hidden[b].device) for b in range(len(inputs.hidden))]


@torch.no_grad()
def linear_groups(layer: nn.Module, linears: dict[str, nn.Module], inputs: LayerInputs) -> list[list[str]]:
    """Linears grouped by the tensor that feeds them, in execution order."""
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []  # keeps inputs referenced so that their ids stay unique
    handles = []
    for name, module in linears.items():
        def hook(_m, args, _name=name):
            alive.append(args[0])
            order.append((_name, id(args[0])))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        inputs.call(layer, 0)
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    seen: set[str] = set()
    for name, key in order:
        if name not in seen:  # a linear called twice (shared weights) stays in its first group
            seen.add(name)
            groups.setdefault(key, []).append(name)
    return list(groups.values()) + [[n] for n in linears if n not in seen]


@torch.no_grad()
def _calibrate_group(layer, inputs: LayerInputs, group: dict[str, nn.Module], compressor: LayerCompressor,
                     times: PhaseTimes) -> None:
    """Feed each batch's inputs of the group's linears to the compressor. The
    layer runs only as far as the group's inputs: what comes after them cannot
    change what they see, so the rest of the forward is skipped."""
    seen: set[str] = set()
    handles = []
    for name, module in group.items():
        def hook(mod, args, _name=name):
            with times.phase("collect"):
                compressor.collect(_name, mod, args[0])  # no_grad: nothing to detach
            seen.add(_name)
            if len(seen) == len(group):
                raise _StopForward
        handles.append(module.register_forward_pre_hook(hook))
    try:
        for batch in range(len(inputs.hidden)):
            seen.clear()
            try:
                inputs.call(layer, batch)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()


def sequential_calibrate(model, windows: torch.Tensor, compressor: LayerCompressor, *, device: torch.device,
                         ignore: list[str], true_sequential: bool = True, batch_size: int = 8,
                         progress: Progress | None = None, label: str = "calibrate",
                         on_layer: LayerObserver | None = None,
                         times: PhaseTimes | None = None, layer_source: LayerSource | None = None,
                         activations: torch.device | None = None) -> list[dict[str, Any]]:
    """Run the loop over every decoder layer; returns the per-module statistics.

    ``on_layer(index, inputs, outputs)``, when given, sees each layer's
    calibration inputs and its outputs after compression (one tensor per batch).
    ``times``, when given, receives the seconds of each phase. ``layer_source``
    supplies the layers (default: the model's, moved to ``device`` and back;
    a streamed model loads each from its checkpoint); ``activations`` is where
    the captured inputs are kept (default ``device``; the host when they do not fit).
    """
    times = times if times is not None else PhaseTimes()
    prefix = layer_prefix(model, decoder_layers(model))

    def calibrate_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> list[dict[str, Any]]:
        return compress_layer(compressor, index, f"{prefix}.{index}", layer, inputs, ignore=ignore,
                              true_sequential=true_sequential, times=times)

    return layerwise(model, windows, calibrate_layer, device=device, batch_size=batch_size, progress=progress,
                     label=label, on_layer=on_layer, times=times, layer_source=layer_source,
                     activations=activations)


def compress_layer(compressor: LayerCompressor, index: int, layer_name: str, layer: nn.Module, inputs: LayerInputs,
                   *, ignore: list[str], true_sequential: bool = True,
                   times: PhaseTimes | None = None) -> list[dict[str, Any]]:
    """Compress one decoder layer (``layer_name``: its path in the model) in place on its calibration
    inputs: the compressor sees each group of linears' inputs (groups fed by one tensor, in execution
    order, with ``true_sequential``; else all at once), then compresses the group. Its statistics rows."""
    times = times if times is not None else PhaseTimes()
    stats: list[dict[str, Any]] = []
    linears = compressor.select(index, find_linears(layer, ignore, layer_name))
    local = {name.removeprefix(f"{layer_name}."): name for name in linears}
    groups = linear_groups(layer, {n: m for n, m in layer.named_modules() if n in local}, inputs) \
        if true_sequential else [list(local)]
    for group in groups:
        members = {local[n]: linears[local[n]] for n in group}
        with times.phase("group_passes"):
            _calibrate_group(layer, inputs, members, compressor, times)
        with times.phase("compress"):
            whole_group = getattr(compressor, "compress_group", None)  # GroupCompressor (awq)
            if whole_group is not None:
                stats += [{"layer": index, **row} for row in whole_group(index, layer_name, layer, members)]
                continue
            for name, module in members.items():
                stats.append({"layer": index, "module": name, **compressor.compress(index, name, module)})
    return stats


LayerFn = Callable[[int, nn.Module, LayerInputs], list[dict[str, Any]]]


def layerwise(model, windows: torch.Tensor, fn: LayerFn, *, device: torch.device, batch_size: int = 8,
              progress: Progress | None = None, label: str = "calibrate", on_layer: LayerObserver | None = None,
              times: PhaseTimes | None = None, layer_source: LayerSource | None = None,
              activations: torch.device | None = None) -> list[dict[str, Any]]:
    """The loop itself, for a step that works on whole decoder layers: capture every layer's inputs
    (batches of ``batch_size`` windows), then for each layer, on ``device``, ``fn(index, layer,
    inputs)`` compresses it in place and returns its statistics rows; the compressed layer is rerun
    for the next layer's inputs. ``on_layer``, ``times``, ``layer_source`` and ``activations`` as in
    :func:`sequential_calibrate`."""
    times = times if times is not None else PhaseTimes()
    layers = decoder_layers(model)
    source = layer_source if layer_source is not None else ResidentLayers(layers, device)
    store = device if activations is None else activations
    with times.phase("capture"):
        captured = capture_layer_inputs(model, layers, windows, store, batch_size)
    hidden = captured.hidden
    stats: list[dict[str, Any]] = []
    indices = range(len(layers))
    for index in progress.track(indices, f"{label}: layers") if progress else indices:
        inputs = captured.layer(index, hidden, None if store == device else device)
        with times.phase("move"):
            layer = source.load(index)
        stats += fn(index, layer, inputs)
        with times.phase("rerun"):
            outputs = run_layer(layer, inputs)
        if on_layer is not None:
            on_layer(index, inputs.hidden, outputs)
        hidden = outputs
        with times.phase("move"):
            source.done(index, layer)
    return stats
