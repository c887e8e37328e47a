"""The ``signround`` step: learned rounding (AutoRound's method) of every
decoder layer, through the shared layer-by-layer loop
(:func:`llmslim.calibration.layerwise`).

For each decoder layer, on the recipe's device, the layer's inputs are the
outputs of the layers quantized before it (the loop's running hidden states).
The targets are the full-precision layer's outputs on those same inputs
(``target: layer``, as in GPTQ), or the full-precision model's own outputs of
the layer, carried alongside the loop (``target: model``, AutoRound's
reference). With ``start: gptq`` the layer is first quantized by GPTQ (the
``gptq`` step's defaults, through the same per-layer calibration as that
step), and the rounding starts from its codes and grid. The roundings of all
the layer's linears are then learned together
(:func:`llmslim.quant.signround.optimise_layer`) so that the quantized layer,
on its inputs, reproduces the targets. The weights are then fixed on the
learned grid: quantize-dequantized (``format: dense``) or packed in the
standard GPTQ layout (``format: gptq``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from llmslim.calibration import LayerInputs, PhaseTimes, compress_layer, layerwise, run_layer
from llmslim.errors import StepError
from llmslim.modeling import decoder_layers, find_linears, layer_prefix, linear_weight, set_linear_weight
from llmslim.quant import QuantSpec
from llmslim.quant.signround import LearnedRounding, optimise_layer
from llmslim.recipe.steps import GptqConfig
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.steps.gptq import GPTQCompressor
from llmslim.steps.quantized import bias_copy, install_if_packed

__all__ = ["apply_signround"]


class _LayerRounder:
    """The per-layer function of the loop: learn, then fix, the roundings of one decoder layer."""

    def __init__(self, model, config, ctx: StepContext):
        self.config, self.ctx = config, ctx
        self.spec = QuantSpec(bits=config.bits, group_size=config.group_size, sym=config.sym)
        self.prefix = layer_prefix(model, decoder_layers(model))
        self.results: dict[str, tuple[Any, Any]] = {}
        self.totals = {"start_error": 0.0, "error": 0.0, "target_norm2": 0.0, "layers_kept_start": 0}
        self.reference: list[torch.Tensor] | None = None   # target model: the full-precision hidden states
        self.times = PhaseTimes()
        self.gptq = GptqConfig(bits=config.bits, group_size=config.group_size, sym=config.sym, ignore=config.ignore)

    def _targets(self, layer, inputs: LayerInputs) -> list[torch.Tensor]:
        """The full-precision layer's outputs: on the inputs it gets, or on the full-precision model's."""
        if self.config.target == "layer":
            return run_layer(layer, inputs)
        reference = inputs if self.reference is None else replace(inputs, hidden=self.reference)
        self.reference = run_layer(layer, reference)
        return self.reference

    def _gptq(self, index: int, here: str, layer, inputs: LayerInputs, linears) -> dict[str, dict[str, Any]]:
        """Quantize the layer with GPTQ in place (the ``gptq`` step's defaults); by linear, where its
        learned rounding starts: the original weight, GPTQ's result, and the weights it rounded."""
        originals = {name: linear_weight(m).detach().clone() for name, m in linears.items()}
        compressor = GPTQCompressor(self.gptq, self.ctx.device, keep_rounded=True)
        compress_layer(compressor, index, here, layer, inputs, ignore=self.config.ignore, times=self.times)
        return {name: {"weight": originals[name], "start": qw, "rounded": compressor.rounded[name]}
                for name, (qw, _) in compressor.results.items()}

    def __call__(self, index: int, layer, inputs: LayerInputs) -> list[dict[str, Any]]:
        cfg, here = self.config, f"{self.prefix}.{index}"
        linears = find_linears(layer, cfg.ignore, here)
        if not linears:
            return []
        targets = self._targets(layer, inputs)
        starts = self._gptq(index, here, layer, inputs, linears) if cfg.start == "gptq" else {}
        try:
            roundings = {name.removeprefix(f"{here}."): LearnedRounding.for_module(m, self.spec, **starts.pop(name, {}))
                         for name, m in linears.items()}
            stats = optimise_layer(layer, roundings, inputs, targets, iters=cfg.iters, lr=cfg.step_size,
                                   seed=self.ctx.seed + index)
        except ValueError as exc:
            raise StepError("signround", f"layer {index}: {exc}") from None
        for (name, module), rounding in zip(linears.items(), roundings.values()):
            qw = rounding.quantized()
            set_linear_weight(module, qw.dequantize().to(module.weight.device, module.weight.dtype))
            self.results[name] = (qw, bias_copy(module))
        for key in ("start_error", "error", "target_norm2"):
            self.totals[key] += getattr(stats, key)
        self.totals["layers_kept_start"] += stats.best_iter < 0
        row = {"layer": index, "modules": len(linears), **stats.row()}
        self.ctx.progress.log(f"signround: layer {index}: relative output error {row['start_relative_error']:.4g} "
                              f"({cfg.start}) -> {row['relative_error']:.4g} in {row['seconds']:.1f} s")
        return [row]

    def changed(self, seconds: float, times: PhaseTimes) -> dict[str, Any]:
        cfg, t = self.config, self.totals
        rel = (lambda e: round((e / t["target_norm2"]) ** 0.5, 6) if t["target_norm2"] > 0 else 0.0)
        return {"modules_quantized": len(self.results),
                "weights_quantized": sum(qw.codes.numel() for qw, _ in self.results.values()),
                "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym, "format": cfg.format,
                "iters": cfg.iters, "lr": cfg.step_size, "batch_size": cfg.batch_size, "start": cfg.start,
                "target": cfg.target, "start_relative_error": rel(t["start_error"]), "relative_error": rel(t["error"]),
                "layers_kept_start": t["layers_kept_start"], "calibration_seconds": round(seconds, 3),
                "phase_seconds": {**times.summary(), **self.times.summary()}}


def apply_signround(model, config, ctx: StepContext) -> StepOutcome:
    if ctx.calibration is None:
        raise StepError("signround", "needs calibration data")
    rounder, times, start = _LayerRounder(model, config, ctx), PhaseTimes(), time.perf_counter()
    rows = layerwise(model, ctx.calibration, rounder, device=ctx.device, batch_size=config.batch_size,
                     progress=ctx.progress, label="signround", times=times)
    if not rounder.results:
        raise StepError("signround", f"no linear layer matched in the decoder layers (ignore={config.ignore})")
    changed = rounder.changed(time.perf_counter() - start, times)
    install_if_packed(model, rounder.results, config, desc_act=False, method="signround")
    return StepOutcome(changed=changed, layers=rows)
