"""GGUF files as a model source: everything llmslim knows about them.

A ``.gguf`` file is read with the optional ``gguf`` package (``pip install
'llmslim-cli[gguf]'``). Validation and ``--dry-run`` read its header only (the
metadata and the tensor table; no tensor data). A run converts it once,
through transformers' GGUF support, into an ordinary Hugging Face folder
(float32 safetensors, tokenizer from the same file) in a cache keyed by the
file's sha256, and everything else treats that folder like any other model.

The weights are dequantized, so the baseline of a run on a quantized GGUF is
the dequantized model (its weights lie on the GGUF's quantization grid).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llmslim.errors import ModelLoadError

__all__ = [
    "GGUF_EXTRA",
    "GGUFHeader",
    "is_gguf_ref",
    "gguf_installed",
    "gguf_file_problem",
    "read_header",
    "gguf_config",
    "gguf_source_info",
    "file_sha256",
    "cache_root",
    "converted_folder",
]

# the distribution is llmslim-cli (pyproject.toml): `llmslim` on the package index is another project
GGUF_EXTRA = "pip install 'llmslim-cli[gguf]' (or pip install gguf)"
SOURCE_FILE = "gguf_source.json"  # written into a converted folder, last before it is renamed into place
LOGGER = logging.getLogger("llmslim")


@dataclass(frozen=True)
class GGUFHeader:
    """What the header of a GGUF file says, without its tensor data."""

    architecture: str
    file_type: str | None  # llama.cpp's whole-file label, e.g. MOSTLY_Q4_1
    tensor_types: dict[str, int]  # tensor count per stored type, e.g. {"Q4_1": 210, "F32": 61}
    tensor_count: int


def is_gguf_ref(ref: str | os.PathLike) -> bool:
    """Whether a model reference names a GGUF file (by its suffix; existence is checked elsewhere)."""
    return str(ref).lower().endswith(".gguf")


def gguf_installed() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _missing_package_message(path: Path) -> str:
    return f"{path} is a GGUF file, which needs the optional `gguf` package: {GGUF_EXTRA}"


def _file_type_name(value) -> str | None:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(value)).name
    except ValueError:
        return str(value)


def _read_header_unchecked(path: Path) -> GGUFHeader:
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")  # memory-mapped: parses the metadata and the tensor table only
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise ValueError("no general.architecture in its metadata")
    type_field = reader.get_field("general.file_type")
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    return GGUFHeader(
        architecture=str(arch_field.contents()),
        file_type=_file_type_name(type_field.contents()) if type_field is not None else None,
        tensor_types=dict(sorted(counts.items())),
        tensor_count=len(reader.tensors),
    )


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The header of a GGUF file; a readable ModelLoadError when it is absent, unreadable or not GGUF."""
    path = Path(path).expanduser()
    if not gguf_installed():
        raise ModelLoadError(_missing_package_message(path))
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return _read_header_unchecked(path)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: cannot read the GGUF header ({type(exc).__name__}: {exc})") from None


def gguf_file_problem(path: Path, what: str = "model") -> str | None:
    """Why a recipe cannot use ``path`` as a GGUF model (None when it can): for validation."""
    if not path.is_file():
        return f"{what} GGUF file not found: {path}"
    if not gguf_installed():
        return _missing_package_message(path)
    try:
        _read_header_unchecked(path)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        return f"{path}: cannot read the GGUF header ({type(exc).__name__}: {exc})"
    return None


def gguf_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """The transformers config from a GGUF header (no tensor data read), without a quantization config."""
    path = Path(path).expanduser().resolve()
    read_header(path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: transformers cannot build a config from this GGUF file: {exc}") from None
    _drop_quantization(config)
    return config


def _drop_quantization(config) -> None:
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    from llmslim.fingerprints import file_sha256 as sha256_of_file

    return sha256_of_file(Path(path))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


def gguf_source_info(path: str | os.PathLike) -> dict:
    """What a report records about a GGUF source: file, sha256, architecture and tensor types."""
    path = Path(path).expanduser().resolve()
    header = read_header(path)
    return {
        "format": "gguf",
        "file": str(path),
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "architecture": header.architecture,
        "file_type": header.file_type,
        "tensor_types": header.tensor_types,
        "tensor_count": header.tensor_count,
        "note": "measured as the dequantized model: tensors converted to float32",
    }


def cache_root() -> Path:
    """``$LLMSLIM_CACHE/gguf``, else ``$XDG_CACHE_HOME/llmslim/gguf``, else ``~/.cache/llmslim/gguf``."""
    own = os.environ.get("LLMSLIM_CACHE")
    if own:
        return Path(own).expanduser() / "gguf"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llmslim" / "gguf"


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def converted_folder(path: str | os.PathLike) -> Path:
    """The HF folder converted from a GGUF file, converting it the first time (atomically)."""
    path = Path(path).expanduser().resolve()
    info = gguf_source_info(path)
    root = cache_root()
    dest = root / info["sha256"]
    if _is_complete(dest):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    LOGGER.info("converting %s (GGUF, %s) once into %s", path, info["file_type"] or "?", dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{info['sha256'][:16]}.", suffix=".tmp", dir=root))
    try:
        _convert(path, staging)
        (staging / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _install(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _install(staging: Path, dest: Path) -> None:
    """Rename the finished conversion into place; another process's complete one wins a race."""
    if dest.exists() and not _is_complete(dest):
        shutil.rmtree(dest, ignore_errors=True)  # a leftover that was never completed
    if _is_complete(dest):
        return
    try:
        os.rename(staging, dest)
    except OSError as exc:
        if not _is_complete(dest):
            raise ModelLoadError(f"cannot move the converted model into {dest}: {exc}") from None


def _convert(path: Path, folder: Path) -> None:
    """Load the GGUF (dequantized) with transformers and save it as a float32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: transformers cannot load this GGUF file: {exc}") from None
    # transformers refuses to save a model loaded from GGUF, so rebuild it as a plain model of the same config
    config = loaded.config
    _drop_quantization(config)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    del loaded
    model.load_state_dict(state, strict=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
