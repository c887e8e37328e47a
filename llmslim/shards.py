"""Checkpoint weights in Hugging Face's sharded safetensors layout, written and read one tensor at a time.

:class:`ShardWriter` takes tensors as they are produced (a whole state dict,
or one decoder layer after another) and flushes a shard to disk as soon as
the pending bytes would exceed ``max_shard_size``, so at most one shard is
held in memory; with ``spool=True`` (streamed runs) not even that: the
pending shard's tensors go to a file beside it as they arrive and the shard is
assembled from it on flush, one chunk at a time. On :meth:`ShardWriter.close` a single shard becomes
``model.safetensors``; several become ``model-00001-of-0000N.safetensors``
plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...},
"weight_map": {...}}``): exactly the names ``save_pretrained`` writes, so
transformers, vLLM and llmslim's own GPTQ loader read the result.

Shards are split greedily in the order tensors arrive (as huggingface_hub
does); a tensor larger than ``max_shard_size`` gets a shard of its own.
Files get the user's umask (``0666 & ~umask``; safetensors itself creates
its files 0600). The readers (:func:`checkpoint_keys`,
:func:`iter_checkpoint_tensors`) open single or sharded checkpoints with
``safe_open`` and materialise one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llmslim.publish import user_umask
from llmslim.weight_files import INDEX_FILE, SINGLE_FILE

if TYPE_CHECKING:  # torch is imported where tensors are handled: the recipe schema imports this module
    import torch

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "SINGLE_FILE", "INDEX_FILE", "parse_size", "ShardWriter",
           "checkpoint_keys", "iter_checkpoint_tensors", "tensor_bytes"]

# transformers 5's default for PreTrainedModel.save_pretrained(max_shard_size="50GB") (decimal units, as the hub's)
DEFAULT_MAX_SHARD_SIZE = 50 * 10**9

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_PENDING_PREFIX = ".shard-"


def parse_size(value: str | int) -> int:
    """``"20GB"``, ``"512MB"``, ``"5GiB"``, ``"1.5GB"``, ``123`` -> bytes (KB/MB/GB/TB decimal, KiB... binary).

    Raises ValueError with a readable message for anything else (negative,
    zero, unknown unit, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("expected a size such as 5GB, 512MiB or a number of bytes")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ValueError("not a size: write a number and a unit, e.g. 5GB, 512MiB, 20GiB")
        number, unit = float(match.group(1)), match.group(2).upper()
        if unit not in _UNITS:
            raise ValueError(f"unknown unit {match.group(2)!r}; use B, KB, MB, GB, TB "
                             "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor's data takes in a safetensors file."""
    return tensor.numel() * tensor.element_size()


def _owned_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that shares no storage with ``tensor`` (the caller may change or free its own)."""
    import torch

    data = tensor.detach()
    if data.device.type != "cpu":
        return data.to("cpu").contiguous()
    return data.clone(memory_format=torch.contiguous_format)


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                       "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
# safetensors' Dtype enum in declaration order: save_file writes tensors by it, descending, then by name
_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64"]
_COPY_CHUNK = 64 * 2**20


class _Spool:
    """One pending shard kept on disk instead of in memory: each tensor's bytes are appended to a spool
    file as it arrives, and :meth:`finish` writes the safetensors file (the JSON header, padded to 8
    bytes, then the data copied in chunks), so at most one tensor is in memory."""

    def __init__(self, path: Path):
        self.path, self.data = path, path.with_name(path.name + ".data")
        self.file = open(self.data, "wb")  # noqa: SIM115 - closed in finish/abort
        self.header: dict[str, dict] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        data = tensor.detach().to("cpu").contiguous()
        dtype = str(data.dtype).removeprefix("torch.")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        start = self.file.tell()
        self.file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self.header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(data.shape),
                             "data_offsets": [start, self.file.tell()]}

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the shard with its tensors in safetensors' own order (dtype, widest first, then name),
        so that it is byte for byte what ``safetensors.torch.save_file`` writes for the same tensors."""
        self.file.close()
        order = sorted(self.header, key=lambda n: (-_DTYPE_RANK.index(self.header[n]["dtype"]), n))
        placed, offset = {}, 0
        for name in order:
            start, end = self.header[name]["data_offsets"]
            placed[name] = {**self.header[name], "data_offsets": [offset, offset + end - start]}
            offset += end - start
        header = json.dumps({"__metadata__": metadata, **placed}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.path, "wb") as out, open(self.data, "rb") as data:
            out.write(len(header).to_bytes(8, "little") + header)
            for name in order:
                start, end = self.header[name]["data_offsets"]
                data.seek(start)
                while start < end:
                    chunk = data.read(min(_COPY_CHUNK, end - start))
                    out.write(chunk)
                    start += len(chunk)
        self.data.unlink()

    def abort(self) -> None:
        self.file.close()
        self.data.unlink(missing_ok=True)


class ShardWriter:
    """Writes a checkpoint's tensors incrementally into ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None, *, spool: bool = False):
        """``spool``: keep the pending shard in a file beside the output rather than in memory (a streamed
        run, whose host must hold about one layer; the output's bytes are written twice)."""
        if max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
        self.folder = Path(folder)
        self.max_shard_size = int(max_shard_size)
        self.metadata = {**(metadata or {}), "format": "pt"}
        self.spool = spool
        self._spool: _Spool | None = None
        self._pending: dict[str, torch.Tensor | None] = {}  # spooled: the names only
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []   # flushed shards under temporary names
        self._names: set[str] = set()
        self._total = 0
        self._closed = False
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def total_size(self) -> int:
        """Bytes of tensor data added so far."""
        return self._total

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue tensors (copied to CPU, contiguous); flush the pending shard first when one would overflow it."""
        if self._closed:
            raise ValueError("ShardWriter.add after close")
        for name, tensor in tensors.items():
            if name in self._names:
                raise ValueError(f"tensor {name!r} was already written to this checkpoint")
            size = tensor_bytes(tensor)
            if self._pending and self._pending_bytes + size > self.max_shard_size:
                self._flush()
            if self.spool:
                self._spool = self._spool or _Spool(self._next_path())
                self._spool.add(name, tensor)
                self._pending[name] = None
            else:
                self._pending[name] = _owned_cpu_copy(tensor)
            self._pending_bytes += size
            self._names.add(name)
            self._total += size

    def _next_path(self) -> Path:
        return self.folder / f"{_PENDING_PREFIX}{len(self._shards) + 1:05d}.safetensors.tmp"

    def _flush(self, *, even_empty: bool = False) -> None:
        from safetensors.torch import save_file

        if not self._pending and not even_empty:
            return
        path = self._next_path()
        if self._spool is not None:
            self._spool.finish(self.metadata)
            self._spool = None
        else:
            save_file(self._pending, str(path), metadata=self.metadata)
        os.chmod(path, 0o666 & ~user_umask())  # safetensors creates its files 0600
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, give the shards their final names, write the index when sharded; the files written."""
        if self._closed:
            raise ValueError("ShardWriter.close called twice")
        self._flush(even_empty=not self._shards)  # an empty checkpoint is still one (empty) safetensors file
        self._closed = True
        count = len(self._shards)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                  for i in range(1, count + 1)]
        self._remove_stale(set(names))
        written = []
        for (tmp, _), name in zip(self._shards, names):
            os.replace(tmp, self.folder / name)
            written.append(self.folder / name)
        if count > 1:
            weight_map = {key: name for (_, keys), name in zip(self._shards, names) for key in keys}
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
            path = self.folder / INDEX_FILE
            path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            written.append(path)
        return written

    def abort(self) -> None:
        """Remove what was flushed so far (after a failure); the folder keeps nothing of this writer."""
        for tmp, _ in self._shards:
            tmp.unlink(missing_ok=True)
        if self._spool is not None:
            self._spool.abort()
            self._spool = None
        self._shards, self._pending, self._closed = [], {}, True

    def _remove_stale(self, keep: set[str]) -> None:
        """Weight files of an earlier save that this one does not replace (a mix would not load)."""
        for path in self.folder.iterdir():
            stale = path.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(path.name)
            if stale and path.name not in keep and path.is_file():
                path.unlink()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def checkpoint_keys(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it, from the index (sharded) or model.safetensors' header.

    Raises FileNotFoundError when the folder has neither, ValueError for an unreadable index."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: no readable weight_map ({type(exc).__name__}: {exc})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map is not an object")
        return {str(key): folder / str(name) for key, name in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(str(single), framework="pt") as handle:
        return {key: single for key in handle.keys()}


def iter_checkpoint_tensors(folder: Path, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of the checkpoint (or only ``names``), one at a time, file by file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, file in checkpoint_keys(folder).items():
        if names is None or key in names:
            by_file.setdefault(file, []).append(key)
    for file in sorted(by_file):
        with safe_open(str(file), framework="pt") as handle:
            for key in by_file[file]:
                yield key, handle.get_tensor(key)
