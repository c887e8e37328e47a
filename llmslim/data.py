"""Datasets named in recipes, read into documents, and cut into token windows.

Dataset specs:

* ``text:PATH``: a UTF-8 file; documents are separated by one or more blank
  lines (empty or only spaces/tabs). Each document is kept exactly as written.
* ``jsonl:PATH#field``: one JSON object a line; the documents are ``field``.
* ``builtin:NAME``: text that ships with every Python (see ``llmslim.builtin_data``).
* ``hf:ID[:config]:split``: a Hugging Face dataset, only when ``datasets`` is
  installed and the hub (or its local cache) is reachable.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from llmslim.errors import UsageError

__all__ = [
    "DatasetSpec",
    "parse_dataset",
    "split_documents",
    "load_documents",
    "join_documents",
    "sample_windows",
    "hash_token_ids",
    "invalid_utf8_message",
    "first_invalid_utf8",
]

_BLANK = re.compile(r"\n(?:[ \t]*\n)+")


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    path: Path | None = None
    field: str | None = None
    name: str | None = None

    def spec(self) -> str:
        if self.kind == "text":
            return f"text:{self.path}"
        if self.kind == "jsonl":
            return f"jsonl:{self.path}#{self.field}"
        return f"{self.kind}:{self.name}"


def parse_dataset(spec: str, base_dir: Path | None = None) -> DatasetSpec:
    """Parse a dataset spec; relative paths are taken from ``base_dir``."""
    kind, _, rest = spec.partition(":")
    if kind in ("text", "jsonl"):
        field = None
        if kind == "jsonl":
            rest, _, field = rest.rpartition("#")
        path = Path(rest).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return DatasetSpec(kind, path=path.resolve(), field=field)
    if kind in ("builtin", "hf"):
        return DatasetSpec(kind, name=rest)
    raise UsageError(f"unknown dataset kind in {spec!r}")


def invalid_utf8_message(offset: int, byte: int | None) -> str:
    """What to say about a file whose ``byte`` at ``offset`` is not valid UTF-8 (None: the file ends
    inside a character)."""
    what = f"byte 0x{byte:02x}" if byte is not None else "a truncated character"
    return f"not UTF-8 text: {what} at byte offset {offset} cannot be decoded; re-save the file as UTF-8"


def first_invalid_utf8(path: Path, chunk_size: int = 1 << 20) -> tuple[int, int | None] | None:
    """(byte offset, byte) of the first invalid UTF-8 in ``path``, streaming; None when it is all valid."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(chunk_size)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                data = pending + chunk
                return offset - len(pending) + exc.start, data[exc.start] if exc.start < len(data) else None
            if not chunk:
                return None
            offset += len(chunk)


def _decode_file(path: Path) -> str:
    """A UTF-8 file's text with universal newlines, or a UsageError naming the first bad byte."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: {invalid_utf8_message(exc.start, raw[exc.start])}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_dataset(ds: DatasetSpec) -> str | None:
    """Why this dataset cannot be read, or None when it looks usable (text files are decoded once)."""
    if ds.kind in ("text", "jsonl"):
        if not ds.path.is_file():
            return f"file not found: {ds.path}" if not ds.path.exists() else f"not a file: {ds.path}"
        try:
            bad = first_invalid_utf8(ds.path)
        except OSError as exc:
            return f"cannot read {ds.path}: {exc.strerror or exc}"
        if bad is not None:
            return f"{ds.path}: {invalid_utf8_message(*bad)}"
        return None
    if ds.kind == "builtin":
        from llmslim.builtin_data import BUILTIN_DATASETS

        if ds.name not in BUILTIN_DATASETS:
            return f"unknown builtin dataset {ds.name!r}; known: {', '.join(sorted(BUILTIN_DATASETS))}"
        return None
    if importlib.util.find_spec("datasets") is None:
        return "hf: datasets need the `datasets` package (pip install datasets) and hub access"
    return None


def split_documents(text: str) -> list[str]:
    """Documents of a text file: separated by blank lines, kept as written."""
    text = text.replace("\r\n", "\n").rstrip("\n")
    docs = _BLANK.split(text)
    return [d for d in docs if d.strip()]


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    with io.StringIO(_decode_file(path)) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UsageError(f"{path}:{lineno}: cannot read field {field!r}: {exc}") from None
            docs.append(str(value))
    return docs


def _read_hf(name: str) -> list[str]:
    import datasets  # optional dependency

    parts = name.split(":")
    ident, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])
    table = datasets.load_dataset(ident, config, split=split)
    column = "text" if "text" in table.column_names else table.column_names[0]
    return [t for t in table[column] if t and t.strip()]


def load_documents(ds: DatasetSpec) -> list[str]:
    """Read a dataset's documents."""
    if ds.kind == "text":
        return split_documents(_decode_file(ds.path))
    if ds.kind == "jsonl":
        return _read_jsonl(ds.path, ds.field)
    if ds.kind == "builtin":
        from llmslim.builtin_data import load_builtin

        return load_builtin(ds.name)
    return _read_hf(ds.name)


def join_documents(docs: list[str]) -> str:
    """The standard evaluation text: documents joined with a blank line."""
    return "\n\n".join(docs)


def file_digest(ds: DatasetSpec) -> str:
    """A content hash of a dataset, cheap enough for fingerprints."""
    h = hashlib.sha256()
    if ds.kind in ("text", "jsonl"):
        h.update(ds.path.read_bytes())
        if ds.field:
            h.update(ds.field.encode())
    else:
        h.update(ds.spec().encode())
    return h.hexdigest()


def sample_windows(ids, samples: int, seqlen: int, seed: int):
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets.

    ``ids`` is a 1-D LongTensor of the whole tokenized text. Returns a
    ``[samples, seqlen]`` LongTensor.
    """
    import torch

    total = ids.numel()
    if total < seqlen + 1:
        raise UsageError(f"calibration text has {total} tokens, fewer than one window of seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def hash_token_ids(ids) -> str:
    """sha256 of token ids as little-endian int64."""
    import numpy as np  # noqa: F401  (torch's .numpy needs it)

    return hashlib.sha256(ids.to("cpu").contiguous().numpy().astype("<i8").tobytes()).hexdigest()
