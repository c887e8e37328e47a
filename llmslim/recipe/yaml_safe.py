"""Reading untrusted recipe YAML with limits: ``yaml.SafeLoader`` semantics,
plus refusals that give a located message instead of a hang, a crash or a
silent surprise.

* control characters (anything YAML cannot print, NUL included; tab, newline
  and carriage return are fine), reported with their line and column;
* nesting deeper than :data:`MAX_DEPTH` (checked while composing, so it never
  reaches Python's recursion limit);
* more than :data:`MAX_ALIASES` aliases, or a document that expands (aliases
  followed) to more than :data:`MAX_NODES` values: the "billion laughs";
* a key given twice in one mapping (PyYAML silently keeps the last one).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from llmslim.errors import RecipeError, RecipeProblem

__all__ = ["MAX_DEPTH", "MAX_ALIASES", "MAX_NODES", "Loc", "parse_yaml", "control_character_problems"]

Loc = tuple[Any, ...]

MAX_DEPTH = 32
MAX_ALIASES = 100
MAX_NODES = 20_000

# What YAML 1.1 allows in a stream (PyYAML's Reader), negated.
_NOT_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def control_character_problems(text: str, file: str, limit: int = 5) -> list[RecipeProblem]:
    """A problem for each of the first ``limit`` characters YAML refuses, with line and column."""
    problems = []
    for match in _NOT_PRINTABLE.finditer(text):
        start = match.start()
        line = text.count("\n", 0, start) + 1
        column = start - (text.rfind("\n", 0, start) + 1) + 1
        code = f"U+{ord(match.group()):04X}"
        problems.append(RecipeProblem(file, line, "", f"control character {code} at column {column} is not "
                                      "allowed in a recipe; remove it (tabs, newlines and CR are fine)"))
        if len(problems) == limit:
            break
    return problems


class _LimitedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer refuses deep nesting and too many aliases."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name); write the values out", mark)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels; a recipe needs far fewer", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        """Values PyYAML refuses with a bare ValueError (``2024-13-45``, ``!!int x``) get the node's line."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:
            value = node.value if isinstance(node, yaml.ScalarNode) else node.id
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {str(value)[:60]!r} ({exc})", node.start_mark) from None


def _key_of(node: yaml.Node) -> Any:
    """A hashable name for a mapping key node (scalars by value, others by kind)."""
    return node.value if isinstance(node, yaml.ScalarNode) else f"<{node.id}>"


def _walk(root: yaml.Node, file: str) -> dict[Loc, int]:
    """Lines of every key path; refuses oversized expansion and duplicate keys."""
    lines: dict[Loc, int] = {}
    problems: list[RecipeProblem] = []
    checked: set[int] = set()
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    visited = 0
    while stack:
        node, path = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            line = node.start_mark.line + 1
            raise RecipeError([RecipeProblem(file, line, "", f"the document expands to more than {MAX_NODES} "
                                             "values (aliases?); a recipe is far smaller")])
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key, line = _key_of(key_node), key_node.start_mark.line + 1
                if key in first and id(node) not in checked and key != "<<":
                    problems.append(RecipeProblem(file, line, _dotted(path + (key,)),
                                                  f"duplicate key {key!r} (first at line {first[key]}); "
                                                  "keep only one"))
                first.setdefault(key, line)
                lines.setdefault(path + (key,), line)
                stack.append((value_node, path + (key,)))
            checked.add(id(node))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, path + (i,)) for i, item in enumerate(node.value))
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: p.line or 0))
    return lines


def _dotted(path: Loc) -> str:
    return ".".join(str(p) for p in path)


def parse_yaml(text: str, file: str) -> tuple[Any, dict[Loc, int]]:
    """``text`` -> (data, line of each key path), or a located :class:`RecipeError`."""
    problems = control_character_problems(text, file)
    if problems:
        raise RecipeError(problems)
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        lines = _walk(node, file) if node is not None else {}
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([RecipeProblem(file, line, "", f"invalid YAML: {problem}")]) from None
    finally:
        loader.dispose()
    return data, lines
