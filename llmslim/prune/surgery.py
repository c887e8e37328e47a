"""Model surgery for structured pruning: slice the linears of a decoder
layer's attention and MLP, remove whole decoder layers, and write the new
sizes into the config so that the result is a plain checkpoint of the same
architecture (``AutoModelForCausalLM.from_pretrained`` loads it).

Linears are ``nn.Linear`` ([out, in]) or GPT-2's ``Conv1D`` ([in, out]); the
slicing keeps each module object, so hooks and references stay valid. A fused
MLP input (Phi-3's ``gate_up_proj``: rows [gate | up]) loses the same channels
in both halves. Which config fields hold one entry per layer comes from the
family table.
"""

from __future__ import annotations

import torch
from torch import nn

from llmslim.modeling import decoder_layers, is_conv1d, layer_prefix, linear_weight
from llmslim.families import Family

__all__ = ["slice_outputs", "slice_inputs", "head_rows", "prune_attention", "prune_mlp",
           "attention_linears", "mlp_linears", "mlp_input_rows", "remove_layers", "write_width_config"]


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad))


def slice_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the output features ``index`` (rows of W, entries of the bias)."""
    index = index.to(module.weight.device)
    if is_conv1d(module):
        _replace(module, "weight", module.weight.data[:, index])
        module.nf = index.numel()
    else:
        _replace(module, "weight", module.weight.data[index])
        module.out_features = index.numel()
    if module.bias is not None:
        _replace(module, "bias", module.bias.data[index])


def slice_inputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the input features ``index`` (columns of W; the bias is unchanged)."""
    index = index.to(module.weight.device)
    if is_conv1d(module):
        _replace(module, "weight", module.weight.data[index])
        module.nx = index.numel()
    else:
        _replace(module, "weight", module.weight.data[:, index])
        module.in_features = index.numel()


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices of whole heads: head h owns features [h * head_dim, (h + 1) * head_dim)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def attention_linears(layer: nn.Module, family: Family) -> tuple[nn.Module, ...]:
    """(attention module, q, k, v, o) of one decoder layer."""
    attn = layer.get_submodule(family.attention)
    return attn, *(attn.get_submodule(name) for name in (family.q, family.k, family.v, family.o))


def mlp_linears(layer: nn.Module, family: Family) -> tuple[list[nn.Module], nn.Module]:
    return [layer.get_submodule(name) for name in family.mlp_in], layer.get_submodule(family.mlp_out)


def mlp_input_rows(family: Family, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The MLP input linears' [out, in] tensors (weights or gradients), one [channels, in] block per
    projection: a fused [gate | up] linear gives its two halves."""
    if not family.fused_mlp_in:
        return list(tensors)
    return [half for t in tensors for half in t.chunk(2, dim=0)]


def prune_attention(layer: nn.Module, family: Family, kept: torch.Tensor, heads: int, kv_heads: int,
                    head_dim: int) -> tuple[int, int]:
    """Keep query heads ``kept`` (whole, equal counts per kept key/value group); returns (heads, kv heads)."""
    attn, q, k, v, o = attention_linears(layer, family)
    group = heads // kv_heads
    kept = kept.sort().values.cpu()
    groups = torch.unique(kept // group)
    per_group = kept.numel() // groups.numel()
    if per_group * groups.numel() != kept.numel() or any(((kept // group) == g).sum() != per_group for g in groups):
        raise ValueError("kept heads must be the same number in every kept key/value group")
    slice_outputs(q, head_rows(kept, head_dim))
    slice_outputs(k, head_rows(groups, head_dim))
    slice_outputs(v, head_rows(groups, head_dim))
    slice_inputs(o, head_rows(kept, head_dim))
    for name, value in (("num_key_value_groups", per_group), ("num_heads", kept.numel()),
                        ("num_attention_heads", kept.numel()), ("num_key_value_heads", groups.numel())):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    return kept.numel(), groups.numel()


def prune_mlp(layer: nn.Module, family: Family, kept: torch.Tensor) -> int:
    """Keep intermediate channels ``kept``; returns the new intermediate size."""
    inputs, output = mlp_linears(layer, family)
    kept = kept.sort().values.cpu()
    channels = linear_weight(output).shape[1]
    rows = torch.cat([kept, kept + channels]) if family.fused_mlp_in else kept
    for module in inputs:
        slice_outputs(module, rows)
    slice_inputs(output, kept)
    return kept.numel()


def write_width_config(config, family: Family, heads: int | None, kv_heads: int | None, head_dim: int,
                       intermediate: int | None) -> None:
    """New head counts (head_dim written explicitly) and intermediate size, in place."""
    if heads is not None:
        setattr(config, family.heads_key, heads)
        if family.kv_heads_key:
            setattr(config, family.kv_heads_key, kv_heads)
        config.head_dim = head_dim
    if intermediate is not None:
        setattr(config, family.intermediate_key, intermediate)


def remove_layers(model: nn.Module, family: Family, drop: list[int]) -> None:
    """Remove decoder layers ``drop``; renumber ``layer_idx`` and subset per-layer config lists."""
    if not drop:
        return
    layers = decoder_layers(model)
    old = len(layers)
    keep = [i for i in range(old) if i not in set(drop)]
    parent_path, _, attr = layer_prefix(model, layers).rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    for new, old_index in enumerate(keep):
        for module in layers[old_index].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    for key in family.per_layer_keys:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == old:
            setattr(config, key, [value[i] for i in keep])
    for key in family.layer_count_keys:  # "the first N layers are of a kind": count the kept ones among them
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, sum(1 for i in keep if i < value))
    setattr(config, family.layers_key, len(keep))
