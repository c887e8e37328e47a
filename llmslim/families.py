"""Everything llmslim knows about a model family, in one table entry per family.

An entry says where the decoder layers sit in the causal LM, the attention and
MLP projections inside a layer (and whether they are fused into one linear),
the layer's norms, which config keys hold the sizes and the context length,
and which config fields carry one value per decoder layer (kept consistent
when layers are removed). Calibration and loading find the decoder layers
with it, pruning its projections and config keys, planning, latency and
validation the hidden size and the context length.

Adding a family is one :class:`Family` in :data:`FAMILIES` plus its tiny
model in ``tests/conftest.py`` ``ARCHS``. No torch here: recipes are checked
against a model's ``config.json`` with these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "ModelShape", "ScaleFold", "family_for", "model_shape", "unsupported_message",
           "context_length", "hidden_size", "layer_count"]

# Where the context length sits in the configs of families not in FAMILIES, most common first.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class ScaleFold:
    """AWQ: where the per-input-channel scales of ``linears`` (linears reading one tensor; paths relative
    to a decoder layer) are folded so that the full-precision function is unchanged. ``prev`` is the norm
    or the linear producing that tensor; ``rows`` which of a previous linear's output rows do: ``all``,
    ``v`` (the value rows: all of v_proj, or the last block of a fused qkv; foldable only when there are
    as many as the group's inputs, i.e. without grouped-query attention) or ``up`` (the second half of a
    fused gate_up). ``needs`` is (config key, accepted values, value when absent) the fold relies on;
    ``why_not`` says why the group is not scaled when ``prev`` is None (no op can absorb the scales) or
    the config does not meet ``needs``."""

    linears: tuple[str, ...]
    prev: str | None
    rows: str = "all"
    needs: tuple[str, tuple, object] | None = None
    why_not: str = ""


@dataclass(frozen=True)
class Family:
    """One family's layout. ``layers`` is relative to the causal LM; ``attention``,
    ``mlp_in``, ``mlp_out`` and ``norms`` to a decoder layer; ``q``, ``k``, ``v``,
    ``o`` and ``head_norms`` to the attention module."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # the nn.ModuleList of decoder layers
    attention: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # linears whose outputs are the intermediate channels
    mlp_out: str  # the linear reading the intermediate channels
    norms: tuple[str, ...]  # the layer's norms over the hidden width (never pruned)
    head_norms: tuple[str, ...] = ()  # norms over head_dim applied to every head (unchanged by head pruning)
    fused_qkv: bool = False  # q, k and v are the row blocks [q | k | v] of one linear
    fused_mlp_in: bool = False  # gate and up are the row halves [gate | up] of one linear
    transposed_linears: bool = False  # GPT-2's Conv1D: weights stored [in, out]
    hidden_key: str = "hidden_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    layers_key: str = "num_hidden_layers"
    intermediate_key: str = "intermediate_size"
    context_key: str = "max_position_embeddings"  # the longest sequence the position embeddings cover
    per_layer_keys: tuple[str, ...] = ()  # config lists with one entry per decoder layer
    layer_count_keys: tuple[str, ...] = ()  # config ints counting the first layers of a kind
    heads_unsupported: str | None = None  # why heads cannot be removed in this family
    # the family's config rejects hidden_size % num_attention_heads != 0 even with an explicit head_dim
    heads_divide_hidden: bool = False
    scale_folds: tuple[ScaleFold, ...] = ()  # AWQ's groups and where their scales fold (llmslim/steps/awq.py)
    norm_offset: float = 0.0  # the norms compute x̂·(offset + w): Gemma's 1

    def head_dim(self, cfg: Mapping) -> int:
        return int(cfg.get("head_dim") or cfg[self.hidden_key] // cfg[self.heads_key])

    def intermediate(self, cfg: Mapping) -> int:
        value = cfg.get(self.intermediate_key)
        return int(value) if value else 4 * int(cfg[self.hidden_key])  # GPT-2: n_inner None = 4 x n_embd


_FIXED_HEAD_DIM = ("{name} attention derives head_dim from {hidden} / {heads}, so a checkpoint with fewer heads "
                   "cannot be described by its config and would not load; keep `heads: 0` for this family "
                   "(mlp and layers can be pruned)")
_SHARED_QKV_SPLIT = ("Phi-3 splits its fused qkv_proj at offsets computed from the config's head counts, which "
                     "every layer shares, so heads cannot be removed one layer at a time; keep `heads: 0` for this "
                     "family (mlp and layers can be pruned)")

_LLAMA_ATTENTION = dict(attention="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj")
_LLAMA_MLP = dict(mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj")
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_GEMMA_NORMS = _LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
_QKV, _GATE_UP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")


def _llama_folds(mlp_norm: str) -> tuple[ScaleFold, ...]:
    return (ScaleFold(_QKV, "input_layernorm"), ScaleFold(("self_attn.o_proj",), "self_attn.v_proj", rows="v"),
            ScaleFold(_GATE_UP, mlp_norm), ScaleFold(("mlp.down_proj",), "mlp.up_proj", rows="up"))


_GELU_DOWN = ("GPT-2's MLP applies GELU between c_fc and c_proj, and GELU(x/s) is not GELU(x)/s, so no op can "
              "absorb c_proj's scales (AWQ would insert a scaling module that stock transformers cannot load); "
              "mlp.c_proj is quantized without scales")
_OPT_PRE_NORM = ("do_layer_norm_before", (True,), True)
_OPT_POST_NORM = ("with do_layer_norm_before false (OPT-350m) the norms follow the residual add, so no op "
                  "produces only this group's input; it is quantized without scales")
_OPT_ACT = ("fc2's scales fold into fc1's rows only through relu (relu(x/s) = relu(x)/s for s > 0); with another "
            "activation fc2 is quantized without scales")
LLAMA_LIKE = dict(layers="model.layers", norms=_LLAMA_NORMS, scale_folds=_llama_folds("post_attention_layernorm"),
                  **_LLAMA_ATTENTION, **_LLAMA_MLP)
_SLIDING_QWEN = dict(per_layer_keys=("layer_types",), layer_count_keys=("max_window_layers",))

FAMILIES: tuple[Family, ...] = (
    Family(name="llama", model_types=("llama",), heads_divide_hidden=True, **LLAMA_LIKE),
    Family(name="mistral", model_types=("mistral",), **LLAMA_LIKE),
    Family(name="qwen2", model_types=("qwen2",), **_SLIDING_QWEN, **LLAMA_LIKE),
    Family(name="qwen3", model_types=("qwen3",), head_norms=("q_norm", "k_norm"), **_SLIDING_QWEN, **LLAMA_LIKE),
    Family(name="gemma2", model_types=("gemma2",), layers="model.layers", norms=_GEMMA_NORMS,
           per_layer_keys=("layer_types",), heads_divide_hidden=True, **_LLAMA_ATTENTION, **_LLAMA_MLP,
           scale_folds=_llama_folds("pre_feedforward_layernorm"), norm_offset=1.0),
    Family(name="gemma3", model_types=("gemma3_text",), layers="model.layers", norms=_GEMMA_NORMS,
           head_norms=("q_norm", "k_norm"), per_layer_keys=("layer_types",), heads_divide_hidden=True,
           **_LLAMA_ATTENTION, **_LLAMA_MLP, scale_folds=_llama_folds("pre_feedforward_layernorm"), norm_offset=1.0),
    Family(name="phi3", model_types=("phi3",), layers="model.layers", norms=_LLAMA_NORMS, attention="self_attn",
           q="qkv_proj", k="qkv_proj", v="qkv_proj", o="o_proj", fused_qkv=True, mlp_in=("mlp.gate_up_proj",),
           fused_mlp_in=True, mlp_out="mlp.down_proj", heads_unsupported=_SHARED_QKV_SPLIT,
           scale_folds=(ScaleFold(("self_attn.qkv_proj",), "input_layernorm"),
                        ScaleFold(("self_attn.o_proj",), "self_attn.qkv_proj", rows="v"),
                        ScaleFold(("mlp.gate_up_proj",), "post_attention_layernorm"),
                        ScaleFold(("mlp.down_proj",), "mlp.gate_up_proj", rows="up"))),
    Family(name="gpt2", model_types=("gpt2",), layers="transformer.h", norms=("ln_1", "ln_2"), attention="attn",
           q="c_attn", k="c_attn", v="c_attn", o="c_proj", fused_qkv=True, mlp_in=("mlp.c_fc",),
           mlp_out="mlp.c_proj", transposed_linears=True, hidden_key="n_embd", heads_key="n_head",
           kv_heads_key=None, layers_key="n_layer", intermediate_key="n_inner", context_key="n_positions",
           heads_unsupported=_FIXED_HEAD_DIM.format(name="GPT-2", hidden="n_embd", heads="n_head"),
           scale_folds=(ScaleFold(("attn.c_attn",), "ln_1"), ScaleFold(("attn.c_proj",), "attn.c_attn", rows="v"),
                        ScaleFold(("mlp.c_fc",), "ln_2"), ScaleFold(("mlp.c_proj",), None, why_not=_GELU_DOWN))),
    Family(name="opt", model_types=("opt",), layers="model.decoder.layers",
           norms=("self_attn_layer_norm", "final_layer_norm"), attention="self_attn", q="q_proj", k="k_proj",
           v="v_proj", o="out_proj", mlp_in=("fc1",), mlp_out="fc2", kv_heads_key=None, intermediate_key="ffn_dim",
           heads_unsupported=_FIXED_HEAD_DIM.format(name="OPT", hidden="hidden_size", heads="num_attention_heads"),
           scale_folds=(ScaleFold(_QKV, "self_attn_layer_norm", needs=_OPT_PRE_NORM, why_not=_OPT_POST_NORM),
                        ScaleFold(("self_attn.out_proj",), "self_attn.v_proj", rows="v"),
                        ScaleFold(("fc1",), "final_layer_norm", needs=_OPT_PRE_NORM, why_not=_OPT_POST_NORM),
                        ScaleFold(("fc2",), "fc1", needs=("activation_function", ("relu",), "relu"),
                                  why_not=_OPT_ACT))),
)


def family_for(model_type: str | None) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def _positive_int(cfg: Mapping, keys) -> tuple[int, str] | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def context_length(cfg: Mapping) -> tuple[int, str] | None:
    """(the longest sequence the model takes, the config key holding it), or None when the config has none."""
    family = family_for(cfg.get("model_type"))
    return _positive_int(cfg, (family.context_key,) if family else CONTEXT_KEYS)


def hidden_size(cfg: Mapping) -> int | None:
    """The width of the residual stream, or None when the config names none."""
    family = family_for(cfg.get("model_type"))
    found = _positive_int(cfg, (family.hidden_key,) if family else HIDDEN_KEYS)
    return found[0] if found else None


def layer_count(cfg: Mapping) -> int | None:
    """The number of decoder layers, or None when the config names none."""
    family = family_for(cfg.get("model_type"))
    found = _positive_int(cfg, (family.layers_key,) if family else LAYER_KEYS)
    return found[0] if found else None


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

    def linear_widths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input widths, output widths) of a decoder layer's linears, fused projections as one linear."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = (q + 2 * kv,) if self.family.fused_qkv else (q, kv)
        mlp = (2 * self.intermediate,) if self.family.fused_mlp_in else (self.intermediate,)
        return (self.hidden, q, self.intermediate), (*attention, self.hidden, *mlp)


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
