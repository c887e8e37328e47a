"""The ``prune`` step: structured pruning of heads, MLP channels and layers.

Width (heads, channels) is pruned inside the shared layer-by-layer
calibration loop: :class:`PruneCompressor` selects each layer's o_proj and
down_proj (the family's equivalents), ``collect`` accumulates the statistics
of their inputs, and ``compress`` removes the least important heads or
channels of that layer, so later layers are calibrated on the pruned model's
activations. The loop's layer observer measures block influence, and the
layers that change their input least are removed at the end. With
``magnitude`` importance and no layer removal no calibration is needed;
``taylor`` first accumulates gradients of the next-token loss on a few
calibration batches over the whole model.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from llmslim.calibration import sequential_calibrate
from llmslim.errors import StepError
from llmslim.modeling import count_parameters, decoder_layers, is_conv1d, layer_prefix, linear_weight
from llmslim.progress import LOGGER
from llmslim.families import ModelShape, model_shape
from llmslim.prune.importance import (channel_output_scores, channel_sq_sums, cosine_sums, head_grams,
                                      head_output_scores, layers_to_drop, magnitude_channel_scores,
                                      magnitude_head_scores, select_channels, select_heads, taylor_channel_scores,
                                      taylor_head_scores)
from llmslim.prune.shapes import PrunePlan, TargetError, plan_pruning
from llmslim.prune.surgery import (attention_linears, mlp_input_rows, mlp_linears, prune_attention, prune_mlp,
                                   remove_layers, write_width_config)
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.gradients import loss_gradients

__all__ = ["apply_prune", "PruneCompressor", "taylor_scores", "TAYLOR_MAX_SAMPLES"]

TAYLOR_MAX_SAMPLES = 32  # calibration windows used for the gradients
TAYLOR_BATCH = 4


def _num(x: float) -> float:
    return float(f"{float(x):.6g}")


class PruneCompressor:
    """Removes the least important heads and MLP channels of each layer."""

    def __init__(self, model: nn.Module, shape: ModelShape, plan: PrunePlan, importance: str,
                 precomputed: dict[int, dict[str, torch.Tensor]] | None = None):
        self.layers = decoder_layers(model)
        self.family, self.shape, self.plan, self.importance = shape.family, shape, plan, importance
        self.precomputed = precomputed or {}
        self.suffix = {"heads": f".{self.family.attention}.{self.family.o}", "mlp": f".{self.family.mlp_out}"}
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}
        self.records: dict[int, dict[str, Any]] = {}

    def kind(self, name: str) -> str | None:
        if self.plan.heads is not None and name.endswith(self.suffix["heads"]):
            return "heads"
        if self.plan.mlp_keep is not None and name.endswith(self.suffix["mlp"]):
            return "mlp"
        return None

    def select(self, layer_index: int, linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return {name: m for name, m in linears.items() if self.kind(name)}

    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if self.importance != "activation":
            return
        stat = head_grams(x, self.shape.heads) if self.kind(name) == "heads" else channel_sq_sums(x)
        total, count = self.sums.get(name, (0, 0))
        self.sums[name] = (total + stat.cpu(), count + x.numel() // x.shape[-1])

    def compress(self, layer_index: int, name: str, module: nn.Module) -> dict[str, Any]:
        kind = self.kind(name)
        layer = self.layers[layer_index]
        scores = self._scores(kind, layer_index, name, layer, module).double().cpu()
        stats = self._prune_heads(layer, scores) if kind == "heads" else self._prune_mlp(layer, scores)
        self.records.setdefault(layer_index, {}).update(stats)
        return stats

    def _scores(self, kind: str, index: int, name: str, layer: nn.Module, module: nn.Module) -> torch.Tensor:
        if self.importance == "activation":
            if name not in self.sums:
                raise StepError("prune", f"{name}: no calibration activations were seen")
            total, count = self.sums.pop(name)
            weight = linear_weight(module).detach().cpu()
            return head_output_scores(total, weight, count) if kind == "heads" else \
                channel_output_scores(total, weight, count)
        if self.importance == "taylor":
            return self.precomputed[index][kind]
        if kind == "heads":
            _, *linears = attention_linears(layer, self.family)
            return magnitude_head_scores(*(linear_weight(m) for m in linears), self.shape.heads, self.shape.kv_heads)
        inputs, output = mlp_linears(layer, self.family)
        return magnitude_channel_scores(mlp_input_rows(self.family, [linear_weight(m) for m in inputs]),
                                        linear_weight(output))

    def _prune_heads(self, layer: nn.Module, scores: torch.Tensor) -> dict[str, Any]:
        shape, target = self.shape, self.plan.heads
        kept = select_heads(scores, shape.kv_heads, target.groups, target.per_group)
        removed = sorted(set(range(shape.heads)) - set(kept.tolist()))
        prune_attention(layer, self.family, kept, shape.heads, shape.kv_heads, shape.head_dim)
        return {"heads_kept": kept.numel(), "heads_removed": removed,
                "heads_removed_importance": [_num(scores[i]) for i in removed],
                "heads_kept_importance_mean": _num(scores[kept].mean())}

    def _prune_mlp(self, layer: nn.Module, scores: torch.Tensor) -> dict[str, Any]:
        kept = select_channels(scores, self.plan.mlp_keep)
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask[kept] = False
        prune_mlp(layer, self.family, kept)
        return {"mlp_channels_kept": kept.numel(), "mlp_channels_removed": int(mask.sum()),
                "mlp_removed_importance_mean": _num(scores[mask].mean()),
                "mlp_kept_importance_mean": _num(scores[kept].mean()),
                "mlp_removed_importance_share": _num(scores[mask].sum() / scores.sum().clamp_min(1e-30))}

    def apply_without_calibration(self, prefix: str, layers=None) -> None:
        """Prune every layer from weight-based scores, without running the model; ``layers``: a streamed
        model's layer source (each layer loaded, pruned and handed back in turn)."""
        for index in range(len(self.layers)):
            layer = layers.load(index) if layers is not None else None
            for kind in ("heads", "mlp"):
                name = f"{prefix}.{index}{self.suffix[kind]}"
                if self.kind(name):
                    self.compress(index, name, None)
            if layers is not None:
                layers.done(index, layer)


class InfluenceMeter:
    """Block influence 1 - E[cos(x_in, x_out)] of each layer, from the loop's observer."""

    def __init__(self):
        self.values: dict[int, float] = {}

    def __call__(self, index: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        total, count = 0.0, 0
        for x_in, x_out in zip(inputs, outputs):
            s, n = cosine_sums(x_in, x_out)
            total, count = total + s, count + n
        self.values[index] = 1.0 - total / max(count, 1)


def _weight_grad(module: nn.Module) -> torch.Tensor:
    grad = module.weight.grad
    if grad is None:
        return torch.zeros_like(linear_weight(module))
    return grad.t() if is_conv1d(module) else grad


def _layer_taylor(layer: nn.Module, shape: ModelShape, plan: PrunePlan) -> dict[str, torch.Tensor]:
    entry = {}
    if plan.heads is not None:
        _, *linears = attention_linears(layer, shape.family)
        entry["heads"] = taylor_head_scores([linear_weight(m) for m in linears], [_weight_grad(m) for m in linears],
                                            shape.heads, shape.kv_heads).cpu()
    if plan.mlp_keep is not None:
        inputs, output = mlp_linears(layer, shape.family)
        entry["mlp"] = taylor_channel_scores(mlp_input_rows(shape.family, [linear_weight(m) for m in inputs]),
                                             mlp_input_rows(shape.family, [_weight_grad(m) for m in inputs]),
                                             linear_weight(output), _weight_grad(output)).cpu()
    return entry


def taylor_scores(model: nn.Module, windows: torch.Tensor, shape: ModelShape, plan: PrunePlan,
                  max_samples: int = TAYLOR_MAX_SAMPLES, batch_size: int = TAYLOR_BATCH) -> dict[int, dict]:
    """|w * dL/dw| summed per head and channel, gradients of the next-token loss accumulated over batches."""
    with loss_gradients(model, windows, max_samples=max_samples, batch_size=batch_size):
        return {i: _layer_taylor(layer, shape, plan) for i, layer in enumerate(decoder_layers(model))}


def _check_layout(model: nn.Module, shape: ModelShape, plan: PrunePlan) -> None:
    """The model has the family's modules (and, when heads go, per-head norms of head_dim)."""
    family = shape.family
    layer = decoder_layers(model)[0]
    attn_paths = [f"{family.attention}.{n}" for n in (family.q, family.k, family.v, family.o) + family.head_norms]
    missing = [p for p in (*attn_paths, *family.mlp_in, family.mlp_out, *family.norms)
               if not _has_submodule(layer, p)]
    if missing:
        raise StepError("prune", f"{type(model).__name__} does not have the {family.name} layout: its decoder "
                                 f"layers lack {', '.join(missing)}")
    if is_conv1d(layer.get_submodule(family.mlp_out)) != family.transposed_linears:
        raise StepError("prune", f"{family.mlp_out} of {type(model).__name__} is not stored as the {family.name} "
                                 "family table says (Conv1D [in, out] or Linear [out, in])")
    if plan.heads is not None:
        _check_head_layout(layer, shape)
    if plan.drop_layers and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise StepError("prune", "removing layers is unsupported with scale_attn_by_inverse_layer_idx: the "
                                 "attention scale of every later layer depends on its index")


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _check_head_layout(layer: nn.Module, shape: ModelShape) -> None:
    family = shape.family
    attn, q, *_ = attention_linears(layer, family)
    if family.fused_qkv:
        raise StepError("prune", f"{family.attention}.{family.q} is a fused q/k/v linear; removing heads from it "
                                 "is unsupported")
    if linear_weight(q).shape[0] != shape.heads * shape.head_dim:
        raise StepError("prune", f"{family.attention}.{family.q} has {linear_weight(q).shape[0]} outputs, not "
                                 f"heads x head_dim = {shape.heads} x {shape.head_dim}; unsupported attention layout")
    for name in family.head_norms:
        weight = getattr(attn.get_submodule(name), "weight", None)
        if weight is not None and weight.numel() != shape.head_dim:
            raise StepError("prune", f"{family.attention}.{name} normalises {weight.numel()} features, not one "
                                     f"head's {shape.head_dim}; removing heads would change it")


def _write_sizes(config, shape: ModelShape, plan: PrunePlan) -> None:
    """The planned widths into a model config (heads, key/value heads, head_dim, intermediate size)."""
    write_width_config(config, shape.family, plan.heads.total if plan.heads else None,
                       plan.heads.groups if plan.heads else None, shape.head_dim, plan.mlp_keep)


def _check_config(model: nn.Module, shape: ModelShape, plan: PrunePlan) -> None:
    """The new sizes must make a config transformers accepts (its own validators), or nothing is touched."""
    trial = copy.deepcopy(model.config)
    _write_sizes(trial, shape, plan)
    validate = getattr(trial, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as exc:  # noqa: BLE001 - any refusal means the checkpoint would not load
            raise StepError("prune", f"the pruned sizes give a {type(trial).__name__} that transformers "
                                     f"rejects: {exc}") from None


def _shape_and_plan(model: nn.Module, config) -> tuple[ModelShape, PrunePlan]:
    try:
        shape = model_shape(model.config.to_dict())
        plan = plan_pruning(shape, config)
    except TargetError as exc:
        raise StepError("prune", f"{exc.field}: {exc}") from None
    except ValueError as exc:
        raise StepError("prune", str(exc)) from None
    _check_layout(model, shape, plan)
    _check_config(model, shape, plan)
    return shape, plan


def _prune_width(model, config, ctx: StepContext, shape: ModelShape, plan: PrunePlan, layers=None,
                 activations: torch.device | None = None) -> tuple[PruneCompressor, InfluenceMeter]:
    width = plan.heads is not None or plan.mlp_keep is not None
    needs_data = plan.drop_layers > 0 or (width and config.importance != "magnitude")
    if needs_data and ctx.calibration is None:
        raise StepError("prune", f"needs calibration data (importance {config.importance!r}"
                                 f"{' and layer removal' if plan.drop_layers else ''} use it)")
    precomputed = None
    if width and config.importance == "taylor":
        precomputed = taylor_scores(model, ctx.calibration, shape, plan)
    compressor, meter = PruneCompressor(model, shape, plan, config.importance, precomputed), InfluenceMeter()
    if needs_data:
        sequential_calibrate(model, ctx.calibration, compressor, device=ctx.device, ignore=[], true_sequential=True,
                             progress=ctx.progress, label="prune", on_layer=meter if plan.drop_layers else None,
                             layer_source=layers, activations=activations)
    else:
        compressor.apply_without_calibration(layer_prefix(model, decoder_layers(model)), layers)
    return compressor, meter


def _gqa_strategy(shape: ModelShape, plan: PrunePlan) -> str:
    target, group = plan.heads, shape.heads // shape.kv_heads
    if target.per_group == group:
        return "whole key/value groups removed with their query heads"
    if target.groups == shape.kv_heads:
        return "the same number of query heads removed from every key/value group"
    return "key/value groups removed, and query heads from every kept group"


def _summary(config, shape: ModelShape, plan: PrunePlan, drop: list[int], before: int, after: int) -> dict:
    heads = plan.heads.total if plan.heads else shape.heads
    kv = plan.heads.groups if plan.heads else shape.kv_heads
    inter = plan.mlp_keep or shape.intermediate
    changed: dict[str, Any] = {
        "importance": config.importance, "family": shape.family.name,
        "parameters_before": before, "parameters_after": after, "parameters_removed": before - after,
        "parameters_removed_fraction": _num((before - after) / before),
        "attention_heads": [shape.heads, heads], "key_value_heads": [shape.kv_heads, kv], "head_dim": shape.head_dim,
        "heads_removed_fraction": _num(1 - heads / shape.heads),
        "intermediate_size": [shape.intermediate, inter], "mlp_removed_fraction": _num(1 - inter / shape.intermediate),
        "decoder_layers": [shape.layers, shape.layers - len(drop)], "layers_removed": drop,
        "notes": list(plan.notes),
    }
    if plan.heads is not None:
        changed["gqa"] = _gqa_strategy(shape, plan)
    return changed


def _layer_report(shape: ModelShape, compressor: PruneCompressor | None, meter: InfluenceMeter | None,
                  drop: list[int]) -> list[dict[str, Any]]:
    rows = []
    for index in range(shape.layers):
        row: dict[str, Any] = {"layer": index, **(compressor.records.get(index, {}) if compressor else {})}
        if meter is not None and index in meter.values:
            row["block_influence"] = _num(meter.values[index])
        row["removed"] = index in drop
        rows.append(row)
    return rows


def apply_prune(model, config, ctx: StepContext, layers=None, activations: torch.device | None = None) -> StepOutcome:
    """``layers``/``activations``: a streamed model's layer source and where its calibration inputs are kept,
    as for :func:`llmslim.steps.gptq.apply_gptq` (width pruning only: layer removal and taylor importance
    need the whole model; :func:`llmslim.stream_run.write_streamed_step` refuses them, see
    :meth:`PruneConfig.stream_problem`)."""
    shape, plan = _shape_and_plan(model, config)
    for note in plan.notes:
        LOGGER.warning("prune: %s", note)
    before = count_parameters(model)
    if plan.noop:
        return StepOutcome(changed=_summary(config, shape, plan, [], before, before),
                           layers=_layer_report(shape, None, None, []))
    start = time.perf_counter()
    compressor, meter = _prune_width(model, config, ctx, shape, plan, layers, activations)
    _write_sizes(model.config, shape, plan)
    drop = layers_to_drop([meter.values[i] for i in range(shape.layers)], plan.drop_layers) \
        if plan.drop_layers else []
    remove_layers(model, shape.family, drop)
    changed = _summary(config, shape, plan, drop, before, count_parameters(model))
    changed["seconds"] = round(time.perf_counter() - start, 3)
    LOGGER.info("prune: %d -> %d parameters (%s removed)", before, changed["parameters_after"],
                f"{changed['parameters_removed_fraction']:.1%}")
    return StepOutcome(changed=changed, layers=_layer_report(shape, compressor, meter, drop))
