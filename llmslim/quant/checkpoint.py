"""GPTQ checkpoints: install packed linears in a model, describe them in
``quantization_config`` / ``quantize_config.json``, and load them back with
llmslim's own kernels (no optimum, no gptqmodel needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmslim.errors import ModelLoadError

__all__ = ["gptq_config_dict", "install_quantized", "write_quantize_config", "load_gptq_model"]


def gptq_config_dict(*, bits: int, group_size: int, sym: bool, desc_act: bool, true_sequential: bool,
                     damp: float, method: str) -> dict:
    """The ``quantization_config`` that transformers, GPTQModel/optimum and vLLM read."""
    from llmslim import __version__

    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "true_sequential": true_sequential,
        "damp_percent": damp,
        "static_groups": False,
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": [f"llmslim:{__version__}"], "method": method},
    }


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
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        [p.name for p in sorted(path.glob("*.safetensors"))]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def _shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def load_gptq_model(path: Path, dtype, *, trust_remote_code: bool = False) -> nn.Module:
    """Build the architecture without initialising it, swap in packed linears, load the tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from llmslim.quant.qlinear import QuantLinear

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype,
                                                 trust_remote_code=trust_remote_code)
    state = _load_state(path)
    for name in sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight")):
        parent, child = _parent(model, name)
        in_f, out_f = _shape(getattr(parent, child))
        setattr(parent, child, QuantLinear(in_f, out_f, quant["bits"], quant["group_size"], quant["sym"],
                                           bias=f"{name}.bias" in state, dtype=model.dtype))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied_head = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if k not in tied and not (tied_head and k.endswith("lm_head.weight"))]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{path}: GPTQ checkpoint does not match its architecture "
                             f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    model.tie_weights()
    model.config.quantization_config = quant
    return model.eval()
