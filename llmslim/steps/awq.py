"""The ``awq`` step: AWQ scales and clipping through the shared layer-by-layer
calibration loop (:func:`llmslim.calibration.sequential_calibrate`, with
``true_sequential`` groups: the linears that read one tensor, in execution
order), the math in :mod:`llmslim.quant.awq`.

For each group the loop collects ``H = 2XᵀX/n`` (shared by the group, as in
GPTQ) and ``mean|x|`` per input channel over all calibration tokens, then
:meth:`AwqCompressor.compress_group`:

1. looks the group up in the family table (``Family.scale_folds`` in
   :mod:`llmslim.families`, judged on the model's config by
   :func:`llmslim.recipe.awq_config.fold_plan`): the norm or previous linear
   its scales fold into, or why it cannot be scaled (grouped-query attention
   for o after v, AWQ's own rule; GELU before GPT-2's mlp.c_proj; OPT's
   post-norm layout). An unscaled group is still clipped and quantized, and
   its reason is in its per-layer rows (``unscaled``) and in ``changed``;
2. searches the scales, folds ``1/s`` into the norm (or the previous linear's
   output rows and bias: when that linear is already quantized, its stored
   per-row scales too, which is exact) and ``s`` into the group's columns; a
   linear reading the same norm but not calibrated (``ignore``) gets ``s`` in
   its columns as well, so the function is unchanged;
3. with ``clip``, searches a clipping range per (row, weight group), except
   for q and k (their error reaches the output through the attention scores,
   which AWQ does not model; fused qkv layers likewise);
4. ``format: gptq``: rounds to nearest (min-max on the clipped weights) and
   keeps the codes for packing; ``format: dense``: leaves the scaled, clipped
   full-precision weights.

With ``rounding: gptq`` step 2 scores every candidate by GPTQ's output error
(:func:`llmslim.quant.awq.search_scales_with`, GPTQ with the ``gptq`` step's
defaults on the scaled weights and Hessian), there is no step 3, and step 4
packs the winner's GPTQ codes; a group that cannot be scaled is plain GPTQ.

Per-layer rows: ``group`` (the linears sharing the scales), ``alpha`` (None: no scaling was best or possible),
``relative_output_error`` (of the AWQ weights rounded as configured, i.e. what
``format: gptq`` packs) next to ``rtn_relative_output_error`` (plain RTN of
the input weights; with ``rounding: gptq`` also ``gptq_relative_output_error``,
plain GPTQ), all on the calibration inputs, and ``clip_ratio`` (the mean
chosen range ratio).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from llmslim.calibration import PhaseTimes, sequential_calibrate
from llmslim.errors import StepError
from llmslim.families import ScaleFold, family_for, model_shape
from llmslim.modeling import is_linear, linear_features, linear_weight, set_linear_weight
from llmslim.quant import QuantizedWeight, QuantSpec, gptq_quantize_weight, rtn_quantize_weight
from llmslim.quant.awq import (Rounder, fold_into_norm, fold_into_rows, scale_columns, scaled_hessian, search_clip,
                               search_scales, search_scales_with)
from llmslim.recipe.awq_config import AwqConfig, awq_model_problem, fold_plan
from llmslim.recipe.steps import GptqConfig
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.steps.gptq import HessianStore, relative_output_error, with_kernels
from llmslim.steps.quantized import bias_copy, install_if_packed, spec_from_config

__all__ = ["apply_awq", "AwqCompressor"]

NOT_IN_TABLE = ("no scale fold is described for this group in llmslim/families.py; it is quantized "
                "without scales")


def gptq_rounder(config: AwqConfig) -> Rounder:
    """GPTQ with the ``gptq`` step's defaults at the step's bits, group size and grid symmetry."""
    gptq = GptqConfig(bits=config.bits, group_size=config.group_size, sym=config.sym)
    spec = spec_from_config(gptq)

    def rounder(w: torch.Tensor, h: torch.Tensor) -> QuantizedWeight:
        try:
            return gptq_quantize_weight(w, h, spec, block_size=gptq.block_size, damp=gptq.damp,
                                        act_order=gptq.act_order, static_groups=gptq.use_static_groups)[0]
        except ValueError as exc:
            raise StepError("awq", str(exc)) from None
    return rounder


class AwqCompressor:
    """The loop's group-level compressor (``compress_group``) for AWQ; see the module docstring."""

    def __init__(self, config: AwqConfig, device: torch.device, model_config: dict):
        self.config, self.device = config, device
        self.spec = QuantSpec(bits=config.bits, group_size=config.group_size, sym=config.sym)
        self.family = family_for(model_config.get("model_type"))
        self.shape = model_shape(model_config)
        self.plan = fold_plan(model_config)
        self.no_clip = {f"{self.family.attention}.{self.family.q}", f"{self.family.attention}.{self.family.k}"}
        self.store = HessianStore("awq", device)
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.quantized: dict[str, QuantizedWeight] = {}
        self.unscaled: dict[str, str] = {}   # group (layer-relative names) -> why it was not scaled
        self.rounder = gptq_rounder(config) if config.rounding == "gptq" else None

    def select(self, layer_index: int, linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return linears

    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        self.store.collect(name, x)
        if self.store.owner[name] == name:   # a new input, not the one the group's previous linear saw
            rows = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float32)
            self.abs_sums[name] = self.abs_sums.get(name, 0) + rows.abs().sum(0)

    def _inputs(self, group: dict[str, nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, mean |x|) of the group's input; the stores drop them."""
        first = next(iter(group))
        key = self.store.owner.get(first)
        if key is None:
            raise StepError("awq", f"{first} received no calibration input (is it used by the forward pass?); "
                                   "add it to `ignore` to leave it as it is")
        h, n = self.store.hessians[key]
        x_mean = self.abs_sums[key] / max(n, 1)
        for name in group:
            self.store.take(name)
        for stale in [k for k in self.abs_sums if k not in self.store.hessians]:
            del self.abs_sums[stale]
        return h, x_mean

    def _fold_for(self, names: tuple[str, ...]) -> tuple[ScaleFold | None, str]:
        for fold, why in self.plan:
            if set(names) <= set(fold.linears):
                return fold, why
        return None, NOT_IN_TABLE

    def _rows(self, fold: ScaleFold, out: int) -> tuple[int, int]:
        """(first row, rows) of the previous linear that feed the group."""
        if fold.rows == "v" and self.family.fused_qkv:
            width = self.shape.kv_heads * self.shape.head_dim
        elif fold.rows == "up" and self.family.fused_mlp_in:
            width = out // 2
        else:
            width = out
        return out - width, width

    def _target(self, layer: nn.Module, fold: ScaleFold, k: int) -> tuple[nn.Module | None, int, str]:
        """(the module the scales fold into, its first row, why not) for a group with ``k`` inputs."""
        prev = dict(layer.named_modules()).get(fold.prev)
        if prev is None:
            return None, 0, f"{fold.prev} not found in the decoder layer"
        if is_linear(prev):
            start, width = self._rows(fold, linear_features(prev)[1])
            if width != k:
                return None, 0, f"{fold.prev} has {width} rows feeding the group, which reads {k} inputs"
            return prev, start, ""
        weight = getattr(prev, "weight", None)
        if weight is None or tuple(weight.shape) != (k,):
            return None, 0, f"the norm {fold.prev} has no weight of one value per channel to fold scales into"
        return prev, 0, ""

    @torch.no_grad()
    def _fold(self, layer: nn.Module, layer_name: str, fold: ScaleFold, target: nn.Module, start: int,
              s: torch.Tensor, group: set[str]) -> None:
        """Divide the target's output by ``s``; multiply the columns of its other readers by ``s``."""
        if is_linear(target):
            w, b = fold_into_rows(linear_weight(target), target.bias, s, start)
            set_linear_weight(target, w)
            qw = self.quantized.get(f"{layer_name}.{fold.prev}")
            if qw is not None:   # already rounded: dividing a row divides its grid scales, exactly
                qw.scales[:, start:start + s.numel()] /= s.to(qw.scales.device)
        else:
            w, b = fold_into_norm(target.weight.data, getattr(target, "bias", None), s, self.family.norm_offset)
            target.weight.data.copy_(w)
        if b is not None:
            target.bias.data.copy_(b)
        modules = dict(layer.named_modules())
        for name in fold.linears:
            if name not in group and name in modules:   # reads the same tensor but is not calibrated
                reader = modules[name]
                set_linear_weight(reader, scale_columns(linear_weight(reader), s))

    def _finish(self, name: str, module: nn.Module, local: str, w: torch.Tensor, s: torch.Tensor | None,
                h: torch.Tensor, rounded: QuantizedWeight | None = None) -> dict[str, Any]:
        """Clip, round (to nearest, or ``rounded``: the search's GPTQ codes), write back; the row's errors."""
        cfg, spec = self.config, self.spec
        scaled = w if s is None else scale_columns(w, s)
        ratio = None
        if cfg.clip and local not in self.no_clip:
            scaled, ratios = search_clip(scaled, h if s is None else scaled_hessian(h, s), spec, cfg.grid)
            ratio = float(ratios.mean())
        try:
            qw = rounded if rounded is not None else rtn_quantize_weight(scaled, spec)
            rtn = rtn_quantize_weight(w, spec).dequantize().to(w.device)
        except ValueError as exc:
            raise StepError("awq", f"{name}: {exc}") from None
        deq = qw.dequantize().to(w.device)
        effective = deq if s is None else deq / s
        if cfg.format == "gptq":
            self.quantized[name] = qw
            set_linear_weight(module, deq)
        else:
            set_linear_weight(module, scaled)
        return {"module": name, "relative_output_error": relative_output_error(w, effective, h),
                "rtn_relative_output_error": relative_output_error(w, rtn, h), "clip_ratio": ratio}

    def _search(self, weights: list[torch.Tensor], x_mean: torch.Tensor, h: torch.Tensor):
        if self.rounder is None:
            return search_scales(weights, x_mean, h, self.spec, self.config.grid, self.config.duo_scaling)
        return search_scales_with(weights, x_mean, h, self.spec, self.rounder, self.config.grid,
                                  self.config.duo_scaling)

    def _plain(self, weights: list[torch.Tensor], h: torch.Tensor) -> list[QuantizedWeight | None]:
        """The rounder's codes of unscaled weights (None per linear when rounding to nearest)."""
        return [None if self.rounder is None else self.rounder(w, h) for w in weights]

    def compress_group(self, layer_index: int, layer_name: str, layer: nn.Module,
                       group: dict[str, nn.Module]) -> list[dict[str, Any]]:
        """Scale (folding the scales), clip and round one group of linears reading the same input."""
        start_time = time.perf_counter()
        local = {name: name.removeprefix(f"{layer_name}.") for name in group}
        h, x_mean = self._inputs(group)
        weights = {name: linear_weight(m).to(self.device, torch.float32, copy=True) for name, m in group.items()}
        fold, why = self._fold_for(tuple(local.values()))
        target, first_row, s, alpha, search = None, 0, None, None, None
        if not why:
            target, first_row, why = self._target(layer, fold, h.shape[0])
        if not why:
            search = self._search(list(weights.values()), x_mean, h)
            alpha = search.alpha
            if alpha is not None:
                s = search.scales
                self._fold(layer, layer_name, fold, target, first_row, s, set(local.values()))
        if why:
            self.unscaled["+".join(local.values())] = why
        searched = search is not None and bool(search.rounded)
        rounded = search.rounded if searched else self._plain(list(weights.values()), h)
        plain = search.base_rounded if searched else rounded
        extra = {"group": "+".join(local.values()), "alpha": alpha, **({"unscaled": why} if why else {})}
        rows = []
        for (name, module), qw, base in zip(group.items(), rounded, plain):
            row = {**self._finish(name, module, local[name], weights[name], s, h, qw), **extra}
            if base is not None:   # rounding gptq: plain GPTQ's error, for comparison
                row["gptq_relative_output_error"] = relative_output_error(
                    weights[name], base.dequantize().to(weights[name].device), h)
            rows.append(row)
        seconds = round(time.perf_counter() - start_time, 4)
        return [{**row, "seconds": seconds} for row in rows]


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(values) / max(len(values), 1), 6)


def apply_awq(model, config: AwqConfig, ctx: StepContext) -> StepOutcome:
    if ctx.calibration is None:
        raise StepError("awq", "needs calibration data")
    model_config = model.config.to_dict()
    problem = awq_model_problem(model_config)
    if problem:
        raise StepError("awq", problem)
    compressor = AwqCompressor(config, ctx.device, model_config)
    start, times = time.perf_counter(), PhaseTimes()
    stats = sequential_calibrate(model, ctx.calibration, compressor, device=ctx.device, ignore=config.ignore,
                                 true_sequential=True, progress=ctx.progress, label="awq", times=times)
    if not stats:
        raise StepError("awq", f"no linear layer matched in the decoder layers (ignore={config.ignore})")
    changed = {"modules": len(stats), "bits": config.bits, "group_size": config.group_size, "format": config.format,
               "clip": config.clip, "scaled_modules": sum(r["alpha"] is not None for r in stats),
               "relative_output_error_mean": _mean(stats, "relative_output_error"),
               "rtn_relative_output_error_mean": _mean(stats, "rtn_relative_output_error"),
               **({"rounding": "gptq", "gptq_relative_output_error_mean": _mean(stats, "gptq_relative_output_error")}
                  if config.rounding == "gptq" else {}),
               "calibration_seconds": round(time.perf_counter() - start, 3), "phase_seconds": times.summary()}
    if compressor.unscaled:
        changed["unscaled"] = dict(compressor.unscaled)
    if config.format == "gptq":
        changed["weights_quantized"] = sum(qw.codes.numel() for qw in compressor.quantized.values())
    results = {name: (qw, bias_copy(model.get_submodule(name))) for name, qw in compressor.quantized.items()}
    install_if_packed(model, results, config, desc_act=False, method="awq")
    return StepOutcome(changed=changed, layers=with_kernels(model, stats))
