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


def _install(model, results: dict, config) -> None:
    install_if_packed(model, results, config, desc_act=False, method="rtn")   # no GPTQ-only fields


@torch.no_grad()
def apply_rtn(model, config, ctx, layers=None):
    """``layers``: a streamed model's layer source (:class:`llmslim.streaming.StreamedLayers`); each
    layer is then loaded, quantized, packed and handed back (written) one at a time."""
    spec = spec_from_config(config)
    own = decoder_layers(model)
    prefix = layer_prefix(model, own)
    stats, count, weights, results = [], 0, 0, {}
    packer = None
    if layers is not None:
        from llmslim.streaming import LayerPacker

        packer = LayerPacker(model, results, lambda done: _install(model, done, config))
    for index in ctx.progress.track(range(len(own)), "rtn: layers"):
        layer = own[index] if layers is None else layers.load(index)
        linears = find_linears(layer, config.ignore, f"{prefix}.{index}")
        for name, module in linears.items():
            w = linear_weight(module).to(torch.float32, copy=True)  # the module is overwritten below
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
        if packer is not None:
            packer.pack(index)
            layers.done(index, layer)
    if count == 0:
        raise StepError("rtn", f"no linear layer matched in the decoder layers (ignore={config.ignore})")
    changed = {"modules_quantized": count, "weights_quantized": weights, "bits": spec.bits,
               "group_size": spec.group_size, "format": config.format}
    if packer is not None:
        return StepOutcome(changed=changed, layers=packer.with_kernels(stats))
    _install(model, results, config)
    return StepOutcome(changed=changed, layers=with_kernels(model, stats))
