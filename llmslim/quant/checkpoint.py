"""GPTQ checkpoints: install packed linears in a model, describe them in
``quantization_config`` / ``quantize_config.json``, and load them back with
llmslim's own kernels (no optimum, no gptqmodel needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmslim.errors import ModelLoadError

__all__ = ["gptq_config_dict", "read_gptq_config", "install_quantized", "write_quantize_config",
           "load_gptq_model"]


def gptq_config_dict(*, bits: int, group_size: int, sym: bool, desc_act: bool, method: str,
                     true_sequential: bool | None = None, damp: float | None = None,
                     static_groups: bool | None = None) -> dict:
    """The ``quantization_config`` that transformers, GPTQModel/optimum and vLLM read.

    The GPTQ-only fields (``true_sequential``, ``damp_percent``,
    ``static_groups``) are written only when given: an RTN checkpoint has none.
    """
    from llmslim import __version__

    config: dict = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym}
    for key, value in (("true_sequential", true_sequential), ("damp_percent", damp), ("static_groups", static_groups)):
        if value is not None:
            config[key] = value
    config.update({"format": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False,
                   "meta": {"quantizer": [f"llmslim:{__version__}"], "method": method}})
    return config


CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}   # format name -> what the stored zero points lack


def read_gptq_config(quant: dict, path: Path) -> tuple[dict, int]:
    """Check a checkpoint's ``quantization_config`` before loading: ``(config, zero_offset)``.

    ``quant_method`` must be ``gptq``, ``bits`` 2/3/4/8, ``group_size`` -1 or
    positive, ``sym``/``desc_act`` booleans, ``pack_dtype`` int32, and the
    format (``checkpoint_format``, else ``format``) ``gptq`` (v1: zeros stored
    as zero - 1) or ``gptq_v2`` (raw zeros). Anything else is refused with a
    ModelLoadError rather than unpacked wrongly.
    """
    from llmslim.quant.packing import PACKABLE_BITS

    def refuse(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: cannot load this GPTQ checkpoint: {why}")

    if quant.get("quant_method") != "gptq":
        raise refuse(f"quant_method is {quant.get('quant_method')!r}, expected 'gptq'")
    bits, group_size = quant.get("bits"), quant.get("group_size", -1)
    if type(bits) is not int or bits not in PACKABLE_BITS:
        raise refuse(f"bits is {bits!r}; llmslim reads {', '.join(map(str, PACKABLE_BITS))}")
    if type(group_size) is not int or (group_size != -1 and group_size < 1):
        raise refuse(f"group_size is {group_size!r}; expected -1 or a positive integer")
    for key in ("sym", "desc_act"):
        if not isinstance(quant.get(key, True if key == "sym" else False), bool):
            raise refuse(f"{key} is {quant.get(key)!r}; expected true or false")
    if quant.get("pack_dtype", "int32") != "int32":
        raise refuse(f"pack_dtype is {quant.get('pack_dtype')!r}; llmslim reads int32 packing only")
    fmt = quant.get("checkpoint_format") or quant.get("format") or "gptq"
    if fmt not in CHECKPOINT_FORMATS:
        raise refuse(f"checkpoint_format is {fmt!r}; llmslim reads {' and '.join(CHECKPOINT_FORMATS)} "
                     f"(re-save it in the gptq format with GPTQModel)")
    config = {**quant, "bits": bits, "group_size": group_size, "sym": quant.get("sym", True)}
    return config, CHECKPOINT_FORMATS[fmt]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def install_quantized(model: nn.Module, results: dict, quant_config: dict) -> int:
    """Replace each named linear by a packed :class:`QuantLinear`.

    ``results`` maps a module name to ``(QuantizedWeight, bias or None)``.
    Returns the number of modules replaced.
    """
    from llmslim.quant.qlinear import QuantLinear

    for name, (qw, bias) in results.items():
        parent, child = _parent(model, name)
        old = getattr(parent, child)
        dtype = old.weight.dtype
        new = QuantLinear.from_quantized(qw, bias, dtype).to(old.weight.device)
        setattr(parent, child, new)
    model.config.quantization_config = quant_config
    return len(results)


def write_quantize_config(folder: Path, config) -> None:
    """``quantize_config.json`` beside config.json, as GPTQ loaders expect."""
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "gptq":
        (Path(folder) / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: single or sharded (index) in HF's layout, else (other GPTQ tools'
    names, e.g. ``gptq_model-4bit-128g.safetensors``) every safetensors file of the folder."""
    from safetensors.torch import load_file

    from llmslim.shards import INDEX_FILE, SINGLE_FILE, iter_checkpoint_tensors

    if (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file():
        try:
            return dict(iter_checkpoint_tensors(path))
        except (ValueError, FileNotFoundError) as exc:
            raise ModelLoadError(f"{path}: cannot read the GPTQ checkpoint's weights: {exc}") from None
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def load_gptq_model(path: Path, dtype, *, trust_remote_code: bool = False) -> nn.Module:
    """Build the architecture without initialising it, swap in packed linears, load the tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from llmslim.modeling import linear_features
    from llmslim.quant.qlinear import QuantLinear

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    quant = config.quantization_config
    quant, zero_offset = read_gptq_config(quant if isinstance(quant, dict) else quant.to_dict(), path)
    del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype,
                                                 trust_remote_code=trust_remote_code)
    state = _load_state(path)
    for name in sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight")):
        parent, child = _parent(model, name)
        in_f, out_f = linear_features(getattr(parent, child))
        setattr(parent, child, QuantLinear(in_f, out_f, quant["bits"], quant["group_size"], quant["sym"],
                                           bias=f"{name}.bias" in state, dtype=model.dtype,
                                           zero_offset=zero_offset))
    own = model.state_dict()
    for key, value in state.items():  # assign (below) keeps the checkpoint's dtypes: use the model's
        if key in own and value.is_floating_point() and value.dtype != own[key].dtype:
            state[key] = value.to(own[key].dtype)
    # assign: the model takes the read tensors as they are, instead of copying them into buffers of its own
    result = model.load_state_dict(state, strict=False, assign=True)
    del own, state
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied_head = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if k not in tied and not (tied_head and k.endswith("lm_head.weight"))]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{path}: GPTQ checkpoint does not match its architecture "
                             f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    model.tie_weights()
    model.config.quantization_config = quant
    return model.eval()
