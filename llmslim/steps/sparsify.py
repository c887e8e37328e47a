"""The ``sparsify`` step: per-weight pruning inside the linears of the decoder
layers (unstructured, or N:M along the input dimension).

* ``wanda`` and ``sparsegpt`` run through the shared layer-by-layer
  calibration loop (:func:`llmslim.calibration.sequential_calibrate`), so each
  layer is pruned on the activations of the layers already pruned: ``wanda``
  collects each input channel's sum of squares, ``sparsegpt`` GPTQ's Hessian
  (:class:`llmslim.steps.gptq.HessianStore`).
* ``magnitude`` needs no activations; ``taylor`` takes the gradients of the
  next-token loss on a few calibration batches over the whole model first.

Weights that are already exactly 0 (an earlier round's) stay removed. The
checkpoint stays dense; the model config gets ``llmslim_sparsity`` so that a
later ``gptq`` or ``distill`` step keeps the zeros. With ``rounds`` > 1 the
target is reached in rounds with recovery between them
(:mod:`llmslim.steps.rounds`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from llmslim.calibration import PhaseTimes, sequential_calibrate
from llmslim.errors import StepError
from llmslim.modeling import decoder_layers, find_linears, is_conv1d, layer_prefix, linear_weight, set_linear_weight
from llmslim.recipe.steps import SparsifyConfig
from llmslim.sparse.masks import (SPARSITY_MARKER, magnitude_scores, nm_mask, row_counts, taylor_scores,
                                  unstructured_mask, wanda_scores)
from llmslim.sparse.sparsegpt import sparsegpt_prune
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.steps.gptq import HessianStore, relative_output_error
from llmslim.gradients import loss_gradients

__all__ = ["apply_sparsify", "sparsify_once", "SparsifyCompressor", "DENSE_NOTE", "TAYLOR_MAX_SAMPLES"]

TAYLOR_MAX_SAMPLES = 32  # calibration windows used for the gradients
TAYLOR_BATCH = 4
DENSE_NOTE = ("the checkpoint is dense: the removed weights are stored as zeros, so it is no smaller and dense "
              "kernels run it no faster; a speed-up needs sparse kernels (e.g. 2:4 on NVIDIA sparse tensor cores)")


def _num(x: float) -> float:
    return float(f"{float(x):.6g}")


class SparsifyCompressor:
    """Removes the lowest-scoring weights of each linear (``LayerCompressor`` of the calibration loop)."""

    def __init__(self, config: SparsifyConfig, device: torch.device, grads: dict[str, torch.Tensor] | None = None):
        self.config, self.device, self.grads = config, device, grads or {}
        self.sq_sums: dict[str, torch.Tensor] = {}
        self.store = HessianStore("sparsify", device)

    def select(self, layer_index: int, linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return linears

    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if self.config.method == "sparsegpt":
            self.store.collect(name, x)
        elif self.config.method == "wanda":
            rows = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float32)
            self.sq_sums[name] = self.sq_sums.get(name, 0) + rows.square().sum(0)

    def _scores(self, name: str, w: torch.Tensor) -> torch.Tensor:
        method = self.config.method
        if method == "wanda":
            if name not in self.sq_sums:
                raise StepError("sparsify", f"{name} received no calibration input (is it used by the forward "
                                            "pass?); add it to `ignore` to leave it dense")
            return wanda_scores(w, self.sq_sums.pop(name))
        if method == "taylor":
            return taylor_scores(w, self.grads.pop(name).to(w.device))
        return magnitude_scores(w)

    def compress(self, layer_index: int, name: str, module: nn.Module) -> dict[str, Any]:
        cfg, start = self.config, time.perf_counter()
        w = linear_weight(module).to(self.device, torch.float32, copy=True)
        forced = w == 0
        row: dict[str, Any] = {}
        if cfg.method == "sparsegpt":
            h = self.store.take(name)
            try:
                new, mask, stats = sparsegpt_prune(w, h, sparsity=cfg.sparsity, pattern=cfg.nm, forced=forced,
                                                   block_size=cfg.block_size, damp=cfg.damp)
            except ValueError as exc:
                raise StepError("sparsify", f"{name}: {exc}") from None
            row = {"relative_output_error": _num(relative_output_error(w, new, h)), "damp": stats.damp_used,
                   "damp_retries": stats.damp_retries}
        else:
            scores = self._scores(name, w)
            mask = nm_mask(scores, *cfg.nm, forced) if cfg.nm else \
                unstructured_mask(scores, row_counts(w.shape[1], cfg.sparsity), forced)
            new = w.masked_fill(mask, 0.0)
        set_linear_weight(module, new.to(module.weight.dtype))
        zeros = int((linear_weight(module) == 0).sum())
        return {"zeros": zeros, "weights": w.numel(), "sparsity": _num(zeros / w.numel()), **row,
                "seconds": round(time.perf_counter() - start, 4)}


def _layer_indices(model: nn.Module, config: SparsifyConfig) -> dict[str, int]:
    """Decoder layer index of every linear to sparsify, by qualified name."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    return {name: index for index, layer in enumerate(layers)
            for name in find_linears(layer, config.ignore, f"{prefix}.{index}")}


def _targets(model: nn.Module, config: SparsifyConfig) -> dict[str, nn.Module]:
    found = {name: model.get_submodule(name) for name in _layer_indices(model, config)}
    if not found:
        raise StepError("sparsify", f"no linear layer matched in the decoder layers (ignore={config.ignore})")
    if config.nm:
        m = config.nm[1]
        bad = [f"{n} ({linear_weight(mod).shape[1]} inputs)" for n, mod in found.items()
               if linear_weight(mod).shape[1] % m]
        if bad:
            raise StepError("sparsify", f"the {config.pattern} pattern needs input widths that are multiples of "
                                        f"{m}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; add them to "
                                        "`ignore` or choose another M")
    return found


def _taylor_grads(model: nn.Module, windows: torch.Tensor, targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """dL/dW of each target linear (Linear layout), summed over a few calibration batches."""
    weights = [module.weight for module in targets.values()]
    with loss_gradients(model, windows, max_samples=TAYLOR_MAX_SAMPLES, batch_size=TAYLOR_BATCH, only=weights):
        out = {}
        for name, module in targets.items():
            grad = module.weight.grad if module.weight.grad is not None else torch.zeros_like(module.weight)
            out[name] = (grad.t() if is_conv1d(module) else grad).detach().float()
        return out


def _summary(model: nn.Module, config: SparsifyConfig, stats: list[dict], seconds: float) -> dict[str, Any]:
    zeros = sum(r["zeros"] for r in stats)
    weights = sum(r["weights"] for r in stats)
    per_layer: dict[int, list[int]] = {}
    for r in stats:
        z, n = per_layer.setdefault(r["layer"], [0, 0])
        per_layer[r["layer"]] = [z + r["zeros"], n + r["weights"]]
    out = {"method": config.method, "target": config.pattern or config.sparsity,
           "modules_sparsified": len(stats), "weights": weights, "zeros": zeros,
           "sparsity": _num(zeros / weights),
           "sparsity_per_layer": [_num(z / n) for _, (z, n) in sorted(per_layer.items())],
           "note": DENSE_NOTE, "seconds": round(seconds, 3)}
    params = list({id(p): p for p in model.parameters()}.values())
    if all(p.device.type != "meta" for p in params):  # streamed, the writer counts them (llmslim.stream_run)
        out["model_sparsity"] = _num(sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params))
    return out


def _magnitude_pass(model: nn.Module, config: SparsifyConfig, compressor: SparsifyCompressor,
                    targets: dict[str, nn.Module], layers) -> list[dict[str, Any]]:
    """Scores from the weights (or precomputed gradients) alone: each target layer, no activations.
    ``layers``: a streamed model's layer source, each layer loaded, pruned and handed back in turn."""
    layer_of, stats = _layer_indices(model, config), []
    with torch.no_grad():
        if layers is None:
            for name, module in targets.items():
                stats.append({"layer": layer_of[name], "module": name, **compressor.compress(0, name, module)})
            return stats
        for index in range(len(layers)):
            layer = layers.load(index)
            for name in (n for n in targets if layer_of[n] == index):
                stats.append({"layer": index, "module": name,
                              **compressor.compress(index, name, model.get_submodule(name))})
            layers.done(index, layer)
    return stats


def sparsify_once(model: nn.Module, config: SparsifyConfig, ctx: StepContext, layers=None,
                  activations: torch.device | None = None) -> StepOutcome:
    """One pruning pass to ``config``'s target (its ``rounds``/``recover`` are not looked at).
    ``layers``/``activations``: a streamed model's layer source and where its calibration inputs are
    kept, as for :func:`llmslim.steps.gptq.apply_gptq` (not with ``taylor``: it needs the whole model)."""
    start, times = time.perf_counter(), PhaseTimes()
    targets = _targets(model, config)
    grads = None
    if config.method == "taylor":
        if ctx.calibration is None:
            raise StepError("sparsify", "method taylor needs calibration data")
        grads = _taylor_grads(model, ctx.calibration, targets)
    compressor = SparsifyCompressor(config, ctx.device, grads)
    if config.method in ("wanda", "sparsegpt"):
        if ctx.calibration is None:
            raise StepError("sparsify", f"method {config.method} needs calibration data")
        stats = sequential_calibrate(model, ctx.calibration, compressor, device=ctx.device, ignore=config.ignore,
                                     true_sequential=True, progress=ctx.progress, label="sparsify", times=times,
                                     layer_source=layers, activations=activations)
    else:
        stats = _magnitude_pass(model, config, compressor, targets, layers)
    changed = _summary(model, config, stats, time.perf_counter() - start)
    if times.seconds:
        changed["phase_seconds"] = times.summary()
    setattr(model.config, SPARSITY_MARKER, {"method": config.method, "pattern": config.pattern,
                                            "sparsity": changed["sparsity"]})
    return StepOutcome(changed=changed, layers=stats)


def apply_sparsify(model: nn.Module, config: SparsifyConfig, ctx: StepContext) -> StepOutcome:
    if config.rounds > 1 or config.recover is not None:
        from llmslim.steps.rounds import run_sparsify_rounds

        return run_sparsify_rounds(model, config, ctx)
    return sparsify_once(model, config, ctx)
