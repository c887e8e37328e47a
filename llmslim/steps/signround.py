"""The ``signround`` step: learned rounding (AutoRound's method) of every
decoder layer, through the shared layer-by-layer loop
(:func:`llmslim.calibration.layerwise`).

For each decoder layer, on the recipe's device: the full-precision layer is
run on its calibration inputs, which are the outputs of the layers quantized
before it (the loop's running hidden states), and those outputs are the
targets; the roundings of all the layer's linears are then learned together
(:func:`llmslim.quant.signround.optimise_layer`) so that the quantized layer,
on the same inputs, reproduces them. (AutoRound's own reference is the
full-precision model's output for full-precision inputs; here each layer's
target is the full-precision layer on the inputs it really gets, as in GPTQ.)
The weights are then fixed on the learned grid: quantize-dequantized
(``format: dense``) or packed in the standard GPTQ layout (``format: gptq``).
"""

from __future__ import annotations

import time
from typing import Any

from llmslim.calibration import LayerInputs, PhaseTimes, layerwise, run_layer
from llmslim.errors import StepError
from llmslim.modeling import decoder_layers, find_linears, layer_prefix, set_linear_weight
from llmslim.quant import QuantSpec
from llmslim.quant.signround import LearnedRounding, optimise_layer
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.steps.quantized import bias_copy, install_if_packed

__all__ = ["apply_signround"]


class _LayerRounder:
    """The per-layer function of the loop: learn, then fix, the roundings of one decoder layer."""

    def __init__(self, model, config, ctx: StepContext):
        self.config, self.ctx = config, ctx
        self.spec = QuantSpec(bits=config.bits, group_size=config.group_size, sym=config.sym)
        self.prefix = layer_prefix(model, decoder_layers(model))
        self.results: dict[str, tuple[Any, Any]] = {}
        self.totals = {"rtn_error": 0.0, "error": 0.0, "target_norm2": 0.0, "layers_kept_rtn": 0}

    def __call__(self, index: int, layer, inputs: LayerInputs) -> list[dict[str, Any]]:
        cfg, here = self.config, f"{self.prefix}.{index}"
        linears = find_linears(layer, cfg.ignore, here)
        if not linears:
            return []
        targets = run_layer(layer, inputs)   # the full-precision layer on the inputs it gets
        try:
            roundings = {name.removeprefix(f"{here}."): LearnedRounding.for_module(m, self.spec)
                         for name, m in linears.items()}
            stats = optimise_layer(layer, roundings, inputs, targets, iters=cfg.iters, lr=cfg.step_size,
                                   seed=self.ctx.seed + index)
        except ValueError as exc:
            raise StepError("signround", f"layer {index}: {exc}") from None
        for (name, module), rounding in zip(linears.items(), roundings.values()):
            qw = rounding.quantized()
            set_linear_weight(module, qw.dequantize().to(module.weight.device, module.weight.dtype))
            self.results[name] = (qw, bias_copy(module))
        for key in ("rtn_error", "error", "target_norm2"):
            self.totals[key] += getattr(stats, key)
        self.totals["layers_kept_rtn"] += stats.best_iter < 0
        row = {"layer": index, "modules": len(linears), **stats.row()}
        self.ctx.progress.log(f"signround: layer {index}: relative output error {row['rtn_relative_error']:.4g} "
                              f"(round-to-nearest) -> {row['relative_error']:.4g} in {row['seconds']:.1f} s")
        return [row]

    def changed(self, seconds: float, times: PhaseTimes) -> dict[str, Any]:
        cfg, t = self.config, self.totals
        rel = (lambda e: round((e / t["target_norm2"]) ** 0.5, 6) if t["target_norm2"] > 0 else 0.0)
        return {"modules_quantized": len(self.results),
                "weights_quantized": sum(qw.codes.numel() for qw, _ in self.results.values()),
                "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym, "format": cfg.format,
                "iters": cfg.iters, "lr": cfg.step_size, "batch_size": cfg.batch_size,
                "rtn_relative_error": rel(t["rtn_error"]), "relative_error": rel(t["error"]),
                "layers_kept_rtn": t["layers_kept_rtn"], "calibration_seconds": round(seconds, 3),
                "phase_seconds": times.summary()}


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
