"""YAML recipe -> validated :class:`Recipe`, or a :class:`RecipeError` whose
problems name the file, the line and the field.

Only ``yaml.SafeLoader`` is used. Line numbers come from the composed node
tree, so every pydantic error can be located back in the file.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmslim.errors import RecipeError, RecipeProblem
from llmslim.recipe.paths import resolve_paths
from llmslim.recipe.schema import Recipe
from llmslim.recipe.steps import STEP_CONFIGS, RtnConfig, StepConfig

__all__ = ["load_recipe", "parse_override"]

Loc = tuple[Any, ...]


def _line_map(node: yaml.Node, path: Loc = ()) -> dict[Loc, int]:
    """Map each key path in a composed YAML tree to its 1-based line."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            lines.update(_line_map(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, path + (i,)))
    return lines


def _parse_yaml(text: str, file: str) -> tuple[Any, dict[Loc, int]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([RecipeProblem(file, line, "", f"invalid YAML: {problem}")]) from None
    finally:
        loader.dispose()
    return data, (_line_map(node) if node is not None else {})


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``a.b.0.c=value`` -> (path, value); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError([RecipeProblem("--set", None, text, "expected KEY.PATH=VALUE")])
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _apply_override(data: dict, path: list[str | int], value: Any, text: str) -> None:
    target: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                raise RecipeError([RecipeProblem("--set", None, text, f"no list item {part}")])
            target = target[part]
            continue
        if not isinstance(target, dict):
            raise RecipeError([RecipeProblem("--set", None, text, f"{part!r} is not a mapping")])
        if target.get(part) is None:
            target[part] = [] if isinstance(nxt, int) else {}
        target = target[part]
    last = path[-1]
    if isinstance(target, list) and isinstance(last, int) and last < len(target):
        target[last] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise RecipeError([RecipeProblem("--set", None, text, "cannot set this path")])


def _field_name(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model class that owns the last element of ``loc``."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if cls is Recipe and part == "steps":
            return None
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        models = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = models[0] if models else ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


class _Problems:
    """Collects located problems for one recipe file."""

    def __init__(self, file: str, lines: dict[Loc, int], overridden: set[Loc]):
        self.file, self.lines, self.overridden, self.items = file, lines, overridden, []

    def add(self, loc: Loc, message: str) -> None:
        if any(loc[: len(o)] == o for o in self.overridden):
            self.items.append(RecipeProblem("--set", None, _field_name(loc), message))
            return
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                line = self.lines[loc[:n]]
                break
        self.items.append(RecipeProblem(self.file, line, _field_name(loc), message))

    def add_validation(self, exc: ValidationError, root: type[BaseModel], prefix: Loc = ()) -> None:
        for err in exc.errors():
            loc = prefix + tuple(err["loc"])
            self.add(loc, _message(err, root, tuple(err["loc"])))


def _message(err: dict, root: type[BaseModel], loc: Loc) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(root, loc)
        known = sorted(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        msg = f"unknown key {loc[-1]!r}"
        if hint:
            return msg + f" (did you mean {hint[0]!r}?)"
        return msg + (f"; known keys: {', '.join(known)}" if known else "")
    if kind == "missing":
        return "required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def _validate_steps(raw: Any, problems: _Problems) -> list[StepConfig]:
    if not isinstance(raw, list):
        if raw is not None:
            problems.add(("steps",), "must be a list of steps, each a mapping with one key such as `- rtn: {bits: 4}`")
        return []
    steps: list[StepConfig] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or len(item) != 1:
            problems.add(("steps", i), "each step is a mapping with exactly one key, the step's name")
            continue
        name, options = next(iter(item.items()))
        cls = STEP_CONFIGS.get(name)
        if cls is None:
            hint = difflib.get_close_matches(str(name), STEP_CONFIGS, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(("steps", i, name), f"unknown step {name!r}{extra}; known steps: {', '.join(STEP_CONFIGS)}")
            continue
        if options is not None and not isinstance(options, dict):
            problems.add(("steps", i, name), "step options must be a mapping")
            continue
        try:
            steps.append(cls.model_validate(options or {}))
        except ValidationError as exc:
            problems.add_validation(exc, cls, ("steps", i, name))
    return steps


def load_recipe(path: str | Path, overrides: list[str] = (), output: str | Path | None = None) -> Recipe:
    """Read, override, validate and resolve one recipe file."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([RecipeProblem(file, None, "", "recipe file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([RecipeProblem(file, None, "", f"cannot read recipe: {exc}")]) from None
    data, lines = _parse_yaml(text, file)
    if not isinstance(data, dict):
        raise RecipeError([RecipeProblem(file, 1, "", "a recipe is a YAML mapping (version, name, model, steps, ...)")])
    overridden: set[Loc] = set()
    for item in overrides:
        key_path, value = parse_override(item)
        _apply_override(data, key_path, value, item)
        overridden.add(tuple(key_path))
    if output is not None:
        data["output"] = str(Path(output).resolve())
        overridden.add(("output",))
    problems = _Problems(file, lines, overridden)
    steps = _validate_steps(data.get("steps"), problems)
    candidate = dict(data, steps=steps or ([RtnConfig()] if problems.items else []))
    recipe = None
    try:
        recipe = Recipe.model_validate(candidate)
    except ValidationError as exc:
        problems.add_validation(exc, Recipe)
    if recipe is not None and not problems.items:
        recipe = resolve_paths(recipe, path.resolve().parent, problems.add)
    if problems.items:
        raise RecipeError(problems.items)
    return recipe
