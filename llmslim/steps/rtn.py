"""The ``rtn`` step: group-wise round-to-nearest, applied as quantize-dequantize."""

from __future__ import annotations

import torch

from llmslim.errors import StepError
from llmslim.modeling import decoder_layers, find_linears, layer_prefix, linear_weight, set_linear_weight
from llmslim.quant import rtn_quantize_weight
from llmslim.steps.base import StepOutcome
from llmslim.steps.gptq import with_kernels
from llmslim.steps.quantized import bias_copy, install_if_packed, spec_from_config

__all__ = ["apply_rtn"]


@torch.no_grad()
def apply_rtn(model, config, ctx):
    spec = spec_from_config(config)
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    stats, count, weights, results = [], 0, 0, {}
    for index in ctx.progress.track(range(len(layers)), "rtn: layers"):
        linears = find_linears(layers[index], config.ignore, f"{prefix}.{index}")
        for name, module in linears.items():
            w = linear_weight(module).float()
            try:
                qw = rtn_quantize_weight(w, spec)
            except ValueError as exc:
                raise StepError("rtn", f"{name}: {exc}") from None
            deq = qw.dequantize()
            set_linear_weight(module, deq.to(module.weight.dtype))
            results[name] = (qw, bias_copy(module))
            rel = ((deq - w).norm() / w.norm().clamp_min(1e-12)).item()
            stats.append({"layer": index, "module": name, "relative_weight_error": rel})
            count += 1
            weights += w.numel()
    if count == 0:
        raise StepError("rtn", f"no linear layer matched in the decoder layers (ignore={config.ignore})")
    changed = {"modules_quantized": count, "weights_quantized": weights, "bits": spec.bits,
               "group_size": spec.group_size, "format": config.format}
    install_if_packed(model, results, config, desc_act=False, method="rtn")   # no GPTQ-only fields
    return StepOutcome(changed=changed, layers=with_kernels(model, stats))
