"""What structured pruning needs to know about each supported model family:
where the attention and MLP linears sit inside a decoder layer, and which
config keys hold the sizes and the context length (``context_length``, also
used by validation). One table entry per family, no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "ModelShape", "family_for", "model_shape", "unsupported_message", "context_length"]

# Where the context length sits in the configs of families not in FAMILIES, most common first.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class Family:
    """A decoder layer's prunable structure. Paths are relative to the layer
    (``attention``, ``mlp_in``, ``mlp_out``) or to the attention module
    (``q``, ``k``, ``v``, ``o``)."""

    name: str
    model_types: tuple[str, ...]
    attention: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # linears whose outputs are the intermediate channels
    mlp_out: str  # the linear reading the intermediate channels
    hidden_key: str = "hidden_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    layers_key: str = "num_hidden_layers"
    intermediate_key: str = "intermediate_size"
    context_key: str = "max_position_embeddings"  # the longest sequence the position embeddings cover
    heads_unsupported: str | None = None  # why heads cannot be removed in this family
    # transformers' LlamaConfig rejects hidden_size % num_attention_heads != 0 even with an explicit head_dim
    heads_divide_hidden: bool = False

    def head_dim(self, cfg: Mapping) -> int:
        return int(cfg.get("head_dim") or cfg[self.hidden_key] // cfg[self.heads_key])

    def intermediate(self, cfg: Mapping) -> int:
        value = cfg.get(self.intermediate_key)
        return int(value) if value else 4 * int(cfg[self.hidden_key])  # GPT-2: n_inner None = 4 x n_embd


_FIXED_HEAD_DIM = ("{name} attention derives head_dim from {hidden} / {heads}, so a checkpoint with fewer heads "
                   "cannot be described by its config and would not load; keep `heads: 0` for this family "
                   "(mlp and layers can be pruned)")

LLAMA_LIKE = dict(attention="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj",
                  mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj")

FAMILIES: tuple[Family, ...] = (
    Family(name="llama", model_types=("llama",), heads_divide_hidden=True, **LLAMA_LIKE),
    Family(name="mistral", model_types=("mistral",), **LLAMA_LIKE),
    Family(name="qwen2", model_types=("qwen2",), **LLAMA_LIKE),
    Family(name="gpt2", model_types=("gpt2",), attention="attn", q="c_attn", k="c_attn", v="c_attn", o="c_proj",
           mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", hidden_key="n_embd", heads_key="n_head", kv_heads_key=None,
           layers_key="n_layer", intermediate_key="n_inner", context_key="n_positions",
           heads_unsupported=_FIXED_HEAD_DIM.format(name="GPT-2", hidden="n_embd", heads="n_head")),
    Family(name="opt", model_types=("opt",), attention="self_attn", q="q_proj", k="k_proj", v="v_proj",
           o="out_proj", mlp_in=("fc1",), mlp_out="fc2", kv_heads_key=None, intermediate_key="ffn_dim",
           heads_unsupported=_FIXED_HEAD_DIM.format(name="OPT", hidden="hidden_size", heads="num_attention_heads")),
)


def family_for(model_type: str | None) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def context_length(cfg: Mapping) -> tuple[int, str] | None:
    """(the longest sequence the model takes, the config key holding it), or None when the config has none."""
    family = family_for(cfg.get("model_type"))
    for key in (family.context_key,) if family else CONTEXT_KEYS:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def unsupported_message(model_type: str | None) -> str:
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    return (f"structured pruning does not support model_type {model_type!r} (its attention/MLP layout is not "
            f"described); supported: {known}")


@dataclass(frozen=True)
class ModelShape:
    """The sizes pruning acts on, read from a config (``config.json`` or ``config.to_dict()``)."""

    family: Family
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    layers: int


def model_shape(cfg: Mapping) -> ModelShape:
    """The shape of a model from its config mapping; ``ValueError`` when the family is not supported."""
    family = family_for(cfg.get("model_type"))
    if family is None:
        raise ValueError(unsupported_message(cfg.get("model_type")))
    heads = int(cfg[family.heads_key])
    kv = cfg.get(family.kv_heads_key) if family.kv_heads_key else None
    return ModelShape(family=family, heads=heads, kv_heads=int(kv or heads), head_dim=family.head_dim(cfg),
                      hidden=int(cfg[family.hidden_key]), intermediate=family.intermediate(cfg),
                      layers=int(cfg[family.layers_key]))
