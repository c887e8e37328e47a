"""Loading, locating and saving models: devices, dtypes, decoder layers,
the linear layers inside them, and checkpoints.

Decoder layers are found where the family table (:mod:`llmslim.families`)
says, else as the ``nn.ModuleList`` whose length is the config's layer count;
linear layers are ``nn.Linear`` or GPT-2's transposed ``Conv1D``, and every
layout question about a linear (its weight, its widths) is answered here.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
from torch import nn

from llmslim.errors import ModelLoadError, UsageError
from llmslim.weight_files import PICKLE_SUFFIXES, KeyReport, key_problem, weights_problem
from llmslim.gguf import converted_folder, is_gguf_ref

__all__ = [
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
    "local_model_path",
    "PICKLE_SUFFIXES",
    "load_model",
    "load_tokenizer",
    "decoder_layers",
    "find_linears",
    "save_checkpoint",
    "weights_size_bytes",
    "count_parameters",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; refuse an absent cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available (use device: auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """The torch dtype for a recipe's ``dtype`` (``auto`` = the checkpoint's)."""
    if name == "auto":
        return "auto"
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        # fp16 matmuls are slow or missing on many CPUs; still honoured, but say it.
        import logging

        logging.getLogger("llmslim").warning("float16 on CPU is slow; bfloat16 or float32 is usually better")
    return dtype


def looks_like_path(ref: str) -> bool:
    """A model reference meant as a folder rather than a hub id ``org/name``."""
    path = Path(ref).expanduser()
    return (ref.startswith((".", "/", "~", "\\")) or path.exists() or ref.count("/") > 1
            or ("/" in ref and path.parent.is_dir()))


def cached_model_path(ref: str) -> Path | None:
    """The local Hugging Face cache's snapshot of hub id ``ref`` (its config.json at least), never the network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(ref, "config.json")
    except HFValidationError:
        return None
    return Path(found).parent if isinstance(found, str) else None


def local_model_path(ref: str) -> Path | None:
    """A model folder, or a hub id's snapshot in the local cache; None when neither exists here."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    return None if looks_like_path(ref) else cached_model_path(ref)


def resolve_model_path(ref: str) -> Path:
    """A local folder for a model: the folder itself, or the hub cache's snapshot (downloaded if absent)."""
    path = Path(ref).expanduser()
    if is_gguf_ref(ref):  # the HF folder converted from it, once, in llmslim's cache (llmslim/gguf.py)
        return converted_folder(path)
    if path.is_dir():
        return path.resolve()
    if looks_like_path(ref):
        what = "is a file, not a model folder" if path.exists() else "not found"
        raise ModelLoadError(f"model folder {what}: {path.absolute()}")
    cached = cached_model_path(ref)
    if cached is not None:
        return cached
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available"
        raise ModelLoadError(
            f"model {ref!r} is not a local folder, not in the local Hugging Face cache, "
            f"and the hub is unreachable ({type(exc).__name__}); download it with `hf download {ref}`"
        ) from None


def _check_weight_files(path: Path, allow_pickle: bool, trust_remote_code: bool) -> None:
    why = weights_problem(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if why:
        raise ModelLoadError(why)


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read config.json: {exc}") from None


def _check_loading_info(path: Path, info: dict) -> None:
    """What transformers could not match while loading (the header check's second line of defence)."""
    report = KeyReport(missing=sorted(info.get("missing_keys") or ()),
                       unexpected=sorted(info.get("unexpected_keys") or ()),
                       mismatched=sorted(map(str, info.get("mismatched_keys") or ())))
    why = key_problem(path, report)
    if why:
        raise ModelLoadError(why)


def load_model(ref: str, dtype: str = "auto", device: torch.device | str = "cpu", *,
               trust_remote_code: bool = False, allow_pickle: bool = False) -> nn.Module:
    """Load a causal LM for compression or evaluation, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(ref)
    device = torch.device(device)
    _check_weight_files(path, allow_pickle, trust_remote_code)
    config = read_config(path)
    quant = config.get("quantization_config") or {}
    from safetensors import SafetensorError

    try:
        if quant.get("quant_method") == "gptq":
            from llmslim.quant.checkpoint import load_gptq_model

            model = load_gptq_model(path, resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True, output_loading_info=True,
            )
            _check_loading_info(path, info)
    except SafetensorError as exc:
        raise ModelLoadError(f"a weight file in {path} is truncated or corrupt ({exc}): re-download or re-save it"
                             ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {exc}") from None
    model.config.use_cache = True
    return model.to(device).eval()


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from None
    return tok


# Wrappers (FSDP, activation checkpointing, torch.compile) that insert a component into module names.
_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def _unwrapped(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: at the family's path, else the module list as long as the layer count."""
    from llmslim.families import family_for, layer_count

    cfg = model.config
    family = family_for(getattr(cfg, "model_type", None))
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if family is not None:
        for name, module in lists:
            path = _unwrapped(name)
            if path == family.layers or path.endswith(f".{family.layers}"):
                return module
    count = layer_count(cfg.to_dict())
    found = [m for _, m in lists if len(m) == count]
    if not found:
        raise UsageError(f"cannot find the {count} decoder layers of {type(model).__name__}")
    return found[0]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transposed linear (weight [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer, whatever its weight layout."""
    out_features, in_features = linear_weight(module).shape
    return in_features, out_features


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def find_linears(root: nn.Module, ignore: list[str] = (), prefix: str = "") -> dict[str, nn.Module]:
    """Linear layers under ``root`` by qualified name, minus ``ignore`` patterns."""
    found = {}
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (name or prefix)
        if not is_linear(module):
            continue
        if any(fnmatch.fnmatch(full, pat) or fnmatch.fnmatch(full.rsplit(".", 1)[-1], pat) for pat in ignore):
            continue
        found[full] = module
    return found


def layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    return next(name for name, m in model.named_modules() if m is layers)


def save_checkpoint(model: nn.Module, tokenizer, folder: Path, max_shard_size: int | None = None) -> None:
    """config, safetensors weights (sharded with model.safetensors.index.json above ``max_shard_size``
    bytes, default transformers' own), generation config and tokenizer."""
    from llmslim.shards import DEFAULT_MAX_SHARD_SIZE

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    from llmslim.quant.checkpoint import write_quantize_config

    write_quantize_config(folder, model.config)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def weights_size_bytes(folder: Path) -> int:
    """Bytes of the weight files (safetensors) in a checkpoint folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def count_parameters(model: nn.Module) -> int:
    """Logical parameters: a quantized linear counts its full weight matrix."""
    seen, total = set(), 0
    for module in model.modules():
        logical = getattr(module, "logical_parameters", None)
        if logical is not None:
            total += logical()
    for p in model.parameters():
        key = id(p) if p.device.type == "meta" else p.data_ptr()  # meta tensors all have data_ptr 0
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` layout [out_features, in_features]."""
    return module.weight.data.t() if is_conv1d(module) else module.weight.data


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a [out, in] weight back in the module's own layout and dtype."""
    target = module.weight.data
    target.copy_(weight.t() if is_conv1d(module) else weight)
