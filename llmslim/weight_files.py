"""A model folder's weight files checked without loading a tensor.

From the safetensors headers alone (tensor names, shapes and byte ranges)
this finds truncated or corrupt files, and compares the tensors with the
state dict of the architecture ``config.json`` describes, built on the meta
device, so that missing weights are not silently initialised at random.
Used at validation (``llmslim validate`` / ``run``) and again before loading.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PICKLE_SUFFIXES", "KeyReport", "pickle_problem", "read_header", "checkpoint_tensors", "compare_keys",
           "weights_problem", "key_problem"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")  # what a packed linear stores instead of `weight`
SHOWN = 5  # keys named in a message
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# transformers ignores these stale buffers of older checkpoints in every model that has them
_STALE_BUFFERS = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")

Shapes = dict[str, tuple[int, ...]]


def pickle_problem(folder: Path, allow_pickle: bool) -> str | None:
    """Why the folder's weight files are refused (pickle only, or none at all), or None."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return None
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        return (f"{folder} has only pickle weights ({', '.join(sorted(pickles))}); pickle files can run code when "
                "loaded. Convert them to safetensors, or set `allow_pickle: true` in the recipe if you trust them")
    if not pickles:
        return f"{folder} holds no weights (*.safetensors)"
    return None


def _corrupt(file: Path, why: str) -> str:
    return f"{file} is truncated or corrupt ({why}): re-download or re-save it"


def header_shapes(header: object, data_bytes: int) -> tuple[Shapes, str | None]:
    """Tensor shapes from a parsed header, or why the header does not describe ``data_bytes`` bytes of data."""
    if not isinstance(header, dict):
        return {}, "its header is not a JSON object"
    shapes: Shapes = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and isinstance(shape, list)):
            return {}, f"tensor {name!r} has no valid shape and data_offsets"
        shapes[name] = tuple(int(s) for s in shape)
        end = max(end, int(offsets[1]))
    if end > data_bytes:
        return {}, f"its header describes {end} bytes of tensor data, the file holds {data_bytes}"
    if end < data_bytes:
        return {}, f"{data_bytes - end} bytes follow the last tensor"
    return shapes, None


def read_header(file: Path) -> tuple[Shapes, str | None]:
    """Tensor name -> shape from a safetensors file's header, or the message saying it is truncated or corrupt."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or length > min(size - 8, _MAX_HEADER):
            return {}, _corrupt(file, f"{size} bytes, shorter than its header says")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}, _corrupt(file, "its header is not valid JSON")
    shapes, why = header_shapes(header, size - 8 - length)
    return shapes, (_corrupt(file, why) if why else None)


def _shard_files(folder: Path, gptq: bool) -> tuple[list[Path], str | None]:
    """The safetensors files the loader reads: the index's shards, model.safetensors, or (GPTQ) every file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return [], _corrupt(index, f"no readable weight_map: {type(exc).__name__}")
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            return [], f"{index} lists {len(absent)} missing shard(s): {', '.join(absent[:SHOWN])}"
        return [folder / n for n in names], None
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], None
    found = sorted(folder.glob("*.safetensors"))
    if gptq and found:
        return found, None
    return [], (f"{folder} has no {SINGLE_FILE} nor {INDEX_FILE} (found: "
                f"{', '.join(p.name for p in found) or 'none'}); transformers loads only those")


def checkpoint_tensors(folder: Path, gptq: bool = False) -> tuple[Shapes, str | None]:
    """Every tensor's shape across the checkpoint's safetensors files, or the first problem with them."""
    files, why = _shard_files(folder, gptq)
    tensors: Shapes = {}
    for file in files:
        shapes, why = read_header(file)
        if why:
            break
        tensors.update(shapes)
    return tensors, why


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint [..], model [..]"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    patterns = list(patterns)
    regex = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
    return lambda key: regex is not None and regex.search(key) is not None


def _packed_modules(found: Shapes, expected: Shapes) -> dict[str, list[str]]:
    """GPTQ linears: module -> the packed parts it lacks (empty when complete)."""
    modules = {k.rsplit(".", 1)[0] for k in found if k.endswith(".qweight")}
    return {m: [f"{m}.{p}" for p in GPTQ_PARTS if f"{m}.{p}" not in found]
            for m in modules if f"{m}.weight" in expected}


def compare_keys(expected: Shapes, found: Shapes, rename: Callable[[str], tuple[str, bool]], *,
                 may_miss: Callable[[str], bool], may_add: Callable[[str], bool]) -> KeyReport:
    """What the checkpoint (``found``) lacks, adds or shapes differently from the model (``expected``).

    ``rename`` maps a checkpoint key to the model's (and says whether a converter reshapes it);
    ``may_miss`` / ``may_add`` are the model's own exceptions (tied weights, stale buffers)."""
    report = KeyReport()
    packed = _packed_modules(found, expected)
    covered = {f"{m}.weight" for m in packed}
    for lacking in packed.values():
        report.missing.extend(lacking)
    packed_keys = {f"{m}.{p}" for m in packed for p in GPTQ_PARTS}
    for key in sorted(found, key=_natural):
        if key in packed_keys:
            continue
        target, converted = rename(key)
        if target not in expected and key in expected:
            target, converted = key, False
        if target not in expected:
            if not may_add(key):
                report.unexpected.append(key)
            continue
        covered.add(target)
        if not converted and found[key] != expected[target]:
            report.mismatched.append(f"{key}: checkpoint {list(found[key])}, config.json {list(expected[target])}")
    report.missing.extend(k for k in expected if k not in covered and not may_miss(k))
    report.missing.sort(key=_natural)
    return report


def _key_renamer(model, expected: Shapes) -> Callable[[str], tuple[str, bool]]:
    """Checkpoint key -> model key as transformers renames it when loading (legacy names, base-model prefix)."""
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers layout: reconcile the base-model prefix only
        return lambda key: ((f"{prefix}.{key}" if prefix and f"{prefix}.{key}" in expected else key), False)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> tuple[str, bool]:
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        return target, pattern is not None

    return rename


def _meta_model(folder: Path, trust_remote_code: bool):
    """The architecture of ``folder``'s config.json on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # packed linears are accounted for by compare_keys
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def key_problem(folder: Path, report: KeyReport) -> str | None:
    """The message for a checkpoint whose tensors do not match its config, or None."""
    if report.ok:
        return None
    parts = []
    for label, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                        ("of another shape", report.mismatched)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > SHOWN else ""
            parts.append(f"{label}: {', '.join(keys[:SHOWN])}{more}")
    return (f"{folder}: the weights do not match the architecture in config.json ({'; '.join(parts)}); loading "
            "would leave weights randomly initialised. Re-save or re-download the complete checkpoint")


def weights_problem(folder: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> str | None:
    """The first thing that would make loading ``folder`` fail or go wrong, from headers and config only."""
    why = pickle_problem(folder, allow_pickle)
    if why or not any(folder.glob("*.safetensors")):
        return why  # pickle weights (allowed): checked by transformers when they load
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{folder}: cannot read config.json: {exc}"
    gptq = (config.get("quantization_config") or {}).get("quant_method") == "gptq"
    found, why = checkpoint_tensors(folder, gptq)
    if why:
        return why
    try:
        model = _meta_model(folder, trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        return f"{folder}: config.json does not describe a loadable causal LM ({type(exc).__name__}: {exc})"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignore_missing = _matcher(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    ignore_unexpected = _matcher(list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
                                 + list(_STALE_BUFFERS))
    report = compare_keys(expected, found, _key_renamer(model, expected),
                          may_miss=lambda k: k in tied or ignore_missing(k), may_add=ignore_unexpected)
    return key_problem(folder, report)
