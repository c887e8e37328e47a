"""Text that ships with every Python: always available offline.

``stdlib-docs:train`` and ``stdlib-docs:test`` are the docstrings of the
running Python's standard library. They are read from the source files with
:mod:`ast`, never by importing a module, so collecting them has no side
effects:

* the stdlib folder (``sysconfig.get_paths()["stdlib"]``) is walked in sorted
  order; ``site-packages`` and the ``test``, ``tests``, ``idlelib``,
  ``lib2to3`` and ``turtledemo`` folders are skipped, and so is any file that
  cannot be read or parsed;
* the module, class and function docstrings of each file
  (``ast.get_docstring(node, clean=True)``), in source order, that are at
  least 60 characters long are kept, each once (first occurrence wins);
* a document belongs to ``test`` when ``zlib.crc32(doc.encode()) % 20 == 0``
  (about 5%), otherwise to ``train``. The split depends only on the text, so
  it is the same on every run and machine, and the two splits are disjoint.

The documents depend on the Python version (its stdlib), not on anything
installed into it.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
import zlib
from pathlib import Path

__all__ = ["BUILTIN_DATASETS", "load_builtin", "stdlib_docstrings"]

BUILTIN_DATASETS: dict[str, str] = {
    "stdlib-docs:train": "docstrings of the running Python's standard library, train split (~95%)",
    "stdlib-docs:test": "docstrings of the running Python's standard library, held-out test split (~5%)",
}

MIN_CHARS = 60
TEST_MODULUS = 20
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                        "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _doc_nodes(body: list[ast.stmt]):
    """Module-level statements down: every class/function definition, in source order.

    Definitions are statements, and statements only sit in the statement
    lists of other statements, so this finds what ``ast.walk`` would, without
    visiting the (many) expression nodes.
    """
    for stmt in body:
        if isinstance(stmt, _DOC_NODES):
            yield stmt
        body_lists = [getattr(stmt, "body", None)]
        body_lists += [holder.body for holder in (*getattr(stmt, "handlers", ()), *getattr(stmt, "cases", ()))]
        body_lists += [getattr(stmt, "orelse", None), getattr(stmt, "finalbody", None)]
        for stmts in body_lists:
            if isinstance(stmts, list):
                yield from _doc_nodes(stmts)


def _file_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    docs = []
    for node in (tree, *_doc_nodes(tree.body)):
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= MIN_CHARS:
            docs.append(doc)
    return docs


@functools.lru_cache(maxsize=None)
def stdlib_docstrings() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train, test)``: the deduplicated stdlib docstrings, split by crc32."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    train: list[str] = []
    test: list[str] = []
    for path in _stdlib_files(root):
        for doc in _file_docstrings(path):
            if doc in seen:
                continue
            seen.add(doc)
            (test if zlib.crc32(doc.encode("utf-8", "surrogatepass")) % TEST_MODULUS == 0 else train).append(doc)
    return tuple(train), tuple(test)


def load_builtin(name: str) -> list[str]:
    """The documents of a builtin dataset (a fresh list; the text is cached)."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown builtin dataset {name!r}; known: {', '.join(sorted(BUILTIN_DATASETS))}")
    train, test = stdlib_docstrings()
    return list(test if name == "stdlib-docs:test" else train)
