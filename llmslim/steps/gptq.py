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
from llmslim.sparse.masks import SPARSITY_MARKER
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.steps.quantized import bias_copy, install_if_packed, spec_from_config

__all__ = ["apply_gptq", "GPTQCompressor", "HessianStore", "relative_output_error", "with_kernels"]


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


class HessianStore:
    """Each linear's Hessian ``2XᵀX/n`` from its calibration inputs. Linears fed by the same tensor
    (q/k/v, gate/up) share one Hessian: it is accumulated once. Shared by ``gptq`` and ``sparsify``."""

    def __init__(self, step: str, device: torch.device):
        self.step, self.device = step, device
        self.hessians: dict[str, tuple[torch.Tensor, int]] = {}   # keyed by the first linear of an input
        self.owner: dict[str, str] = {}                            # linear -> key of its Hessian
        self._last: tuple[torch.Tensor | None, str] = (None, "")   # the input seen last, and its key

    def collect(self, name: str, x: torch.Tensor) -> None:
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

    def take(self, name: str) -> torch.Tensor:
        """The Hessian of ``name``, dropped once no other linear still needs it."""
        if name not in self.owner:
            raise StepError(self.step, f"{name} received no calibration input (is it used by the forward pass?); "
                                       "add it to `ignore` to leave it as it is")
        key = self.owner.pop(name)
        h = self.hessians[key][0]
        if key not in self.owner.values():
            del self.hessians[key]
        self._last = (None, "")
        return h


class GPTQCompressor:
    """Collects each linear's Hessian and quantizes it with GPTQ. With ``keep_zeros`` (a model
    sparsified earlier) the exact zeros of every weight stay exactly 0; with ``keep_rounded``,
    ``rounded`` keeps each linear's weights as GPTQ rounded them (learned rounding starts there)."""

    def __init__(self, config, device: torch.device, keep_zeros: bool = False, keep_rounded: bool = False):
        self.config, self.device, self.keep_zeros, self.keep_rounded = config, device, keep_zeros, keep_rounded
        self.spec = spec_from_config(config)
        self.store = HessianStore("gptq", device)
        self.results: dict[str, tuple[Any, torch.Tensor | None]] = {}
        self.rounded: dict[str, torch.Tensor] = {}

    @property
    def hessians(self) -> dict[str, tuple[torch.Tensor, int]]:
        return self.store.hessians

    def select(self, layer_index: int, linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return linears

    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        self.store.collect(name, x)

    def compress(self, layer_index: int, name: str, module: nn.Module) -> dict[str, Any]:
        cfg = self.config
        h = self.store.take(name)
        w = linear_weight(module).to(self.device, torch.float32, copy=True)  # the module is overwritten below
        start = time.perf_counter()
        try:
            qw, stats = gptq_quantize_weight(w, h, self.spec, block_size=cfg.block_size, damp=cfg.damp,
                                             act_order=cfg.act_order, static_groups=cfg.use_static_groups,
                                             pruned=(w == 0) if self.keep_zeros else None,
                                             keep_rounded=self.keep_rounded)
        except ValueError as exc:
            raise StepError("gptq", f"{name}: {exc}") from None
        seconds = time.perf_counter() - start
        deq = qw.dequantize().to(w.device)
        set_linear_weight(module, deq.to(module.weight.dtype))
        self.results[name] = (qw, bias_copy(module))
        if stats.rounded is not None:
            self.rounded[name] = stats.rounded
        return {"relative_output_error": relative_output_error(w, deq, h), "damp": stats.damp_used,
                "damp_retries": stats.damp_retries, "dead_columns": stats.dead_columns, "seconds": seconds}


def _install(model, results: dict, config) -> None:
    install_if_packed(model, results, config, desc_act=config.act_order and not config.use_static_groups,
                      true_sequential=config.true_sequential, damp=config.damp,
                      static_groups=config.use_static_groups, method="gptq")


def apply_gptq(model, config, ctx: StepContext, layers=None, activations: torch.device | None = None) -> StepOutcome:
    """``layers``: a streamed model's layer source (:class:`llmslim.streaming.StreamedLayers`); each layer
    is then packed as soon as it is done and written by the source, and no codes are kept between layers.
    ``activations``: where the calibration inputs are kept (default: the device)."""
    if ctx.calibration is None:
        raise StepError("gptq", "needs calibration data")
    compressor = GPTQCompressor(config, ctx.device, keep_zeros=bool(getattr(model.config, SPARSITY_MARKER, None)))
    packer = None
    if layers is not None:
        from llmslim.streaming import LayerPacker

        packer = LayerPacker(model, compressor.results, lambda results: _install(model, results, config))
    start, times = time.perf_counter(), PhaseTimes()
    stats = sequential_calibrate(model, ctx.calibration, compressor, device=ctx.device, ignore=config.ignore,
                                 true_sequential=config.true_sequential, progress=ctx.progress, label="gptq",
                                 times=times, layer_source=layers, activations=activations,
                                 on_layer=packer.pack if packer else None)
    count = packer.modules if packer else len(compressor.results)
    if not count:
        raise StepError("gptq", f"no linear layer matched in the decoder layers (ignore={config.ignore})")
    changed = {"modules_quantized": count,
               "weights_quantized": packer.weights if packer else
               sum(qw.codes.numel() for qw, _ in compressor.results.values()),
               "bits": config.bits, "group_size": config.group_size, "format": config.format,
               "calibration_seconds": round(time.perf_counter() - start, 3),
               "phase_seconds": times.summary()}
    if compressor.keep_zeros:
        changed["sparsity_kept"] = "the zeros of the earlier sparsify step stay exactly 0 (masked in GPTQ's update)"
    if packer is not None:
        return StepOutcome(changed=changed, layers=packer.with_kernels(stats))
    _install(model, compressor.results, config)
    return StepOutcome(changed=changed, layers=with_kernels(model, stats))
