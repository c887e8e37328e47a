"""The ``gptq`` step: GPTQ through the shared layer-by-layer calibration loop,
then the packed GPTQ format installed in the model."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from llmslim.calibration import PhaseTimes, sequential_calibrate
from llmslim.errors import StepError
from llmslim.modeling import linear_weight, set_linear_weight
from llmslim.quant import accumulate_hessian, gptq_quantize_weight, make_empty_hessian
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.steps.quantized import bias_copy, install_if_packed, spec_from_config

__all__ = ["apply_gptq", "GPTQCompressor", "relative_output_error", "with_kernels"]


def with_kernels(model: nn.Module, stats: list[dict]) -> list[dict]:
    """Per-layer statistics with the forward path each packed linear takes in the model's dtype
    (``kernel``: int4pack, int4pack+pad, int8pack or dequant); unchanged for ``format: dense``."""
    out = []
    for row in stats:
        module = model.get_submodule(row["module"]) if "module" in row else None
        out.append({**row, "kernel": module.kernel} if hasattr(module, "qweight") else row)
    return out


def relative_output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """||X(W-Q)ᵀ|| / ||XWᵀ|| on the calibration inputs, from H = 2XᵀX/n."""
    d = (w - q).to(h.dtype)
    num = torch.einsum("ok,kl,ol->", d, h, d)
    den = torch.einsum("ok,kl,ol->", w.to(h.dtype), h, w.to(h.dtype))
    return (num.clamp_min(0) / den.clamp_min(1e-30)).sqrt().item()


class GPTQCompressor:
    """Collects each linear's Hessian and quantizes it with GPTQ. Linears fed
    by the same tensor (q/k/v, gate/up) share one Hessian: it is accumulated
    once."""

    def __init__(self, config, device: torch.device):
        self.config, self.device = config, device
        self.spec = spec_from_config(config)
        self.hessians: dict[str, tuple[torch.Tensor, int]] = {}   # keyed by the first linear of an input
        self.owner: dict[str, str] = {}                            # linear -> key of its Hessian
        self._last: tuple[torch.Tensor | None, str] = (None, "")   # the input seen last, and its key
        self.results: dict[str, tuple[Any, torch.Tensor | None]] = {}

    def select(self, layer_index: int, linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return linears

    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        last_x, last_key = self._last
        if x is last_x and last_key != name:  # the very tensor the previous linear saw
            self.owner[name] = last_key
            return
        if name not in self.hessians:
            self.hessians[name] = (make_empty_hessian(x.shape[-1], self.device), 0)
        self.owner[name] = name
        h, n = self.hessians[name]
        self.hessians[name] = accumulate_hessian(h, n, x.to(self.device))
        self._last = (x, name)

    def _take_hessian(self, name: str) -> torch.Tensor:
        """The Hessian of ``name``, dropped once no other linear still needs it."""
        if name not in self.owner:
            raise StepError("gptq", f"{name} received no calibration input (is it used by the forward pass?); "
                                    "add it to `ignore` to leave it in full precision")
        key = self.owner.pop(name)
        h = self.hessians[key][0]
        if key not in self.owner.values():
            del self.hessians[key]
        self._last = (None, "")
        return h

    def compress(self, layer_index: int, name: str, module: nn.Module) -> dict[str, Any]:
        cfg = self.config
        h = self._take_hessian(name)
        w = linear_weight(module).to(self.device, torch.float32, copy=True)  # the module is overwritten below
        start = time.perf_counter()
        try:
            qw, stats = gptq_quantize_weight(w, h, self.spec, block_size=cfg.block_size, damp=cfg.damp,
                                             act_order=cfg.act_order, static_groups=cfg.use_static_groups)
        except ValueError as exc:
            raise StepError("gptq", f"{name}: {exc}") from None
        seconds = time.perf_counter() - start
        deq = qw.dequantize().to(w.device)
        set_linear_weight(module, deq.to(module.weight.dtype))
        self.results[name] = (qw, bias_copy(module))
        return {"relative_output_error": relative_output_error(w, deq, h), "damp": stats.damp_used,
                "damp_retries": stats.damp_retries, "dead_columns": stats.dead_columns, "seconds": seconds}


def apply_gptq(model, config, ctx: StepContext) -> StepOutcome:
    if ctx.calibration is None:
        raise StepError("gptq", "needs calibration data")
    compressor = GPTQCompressor(config, ctx.device)
    start, times = time.perf_counter(), PhaseTimes()
    stats = sequential_calibrate(model, ctx.calibration, compressor, device=ctx.device, ignore=config.ignore,
                                 true_sequential=config.true_sequential, progress=ctx.progress, label="gptq",
                                 times=times)
    if not compressor.results:
        raise StepError("gptq", f"no linear layer matched in the decoder layers (ignore={config.ignore})")
    changed = {"modules_quantized": len(compressor.results),
               "weights_quantized": sum(qw.codes.numel() for qw, _ in compressor.results.values()),
               "bits": config.bits, "group_size": config.group_size, "format": config.format,
               "calibration_seconds": round(time.perf_counter() - start, 3),
               "phase_seconds": times.summary()}
    install_if_packed(model, compressor.results, config, desc_act=config.act_order and not config.use_static_groups,
                      true_sequential=config.true_sequential, damp=config.damp,
                      static_groups=config.use_static_groups, method="gptq")
    return StepOutcome(changed=changed, layers=with_kernels(model, stats))
