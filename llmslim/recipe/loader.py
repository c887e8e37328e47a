"""YAML recipe -> validated :class:`Recipe`, or a :class:`RecipeError` whose
problems name the file, the line and the field.

The YAML is read by :mod:`llmslim.recipe.yaml_safe` (SafeLoader semantics with
limits). Line numbers come from the composed node tree, so every pydantic error
can be located back in the file; a problem a ``--set``/``--output`` value caused
is blamed on that value.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llmslim.errors import RecipeError, RecipeProblem
from llmslim.recipe.paths import resolve_paths
from llmslim.recipe.schema import Recipe
from llmslim.recipe.steps import STEP_CONFIGS, RtnConfig, StepConfig
from llmslim.recipe.yaml_safe import Loc, parse_yaml

__all__ = ["load_recipe", "parse_override"]

MAX_RECIPE_BYTES = 1_000_000


def _parse_value(raw: str, text: str) -> Any:
    """A ``--set`` value read as YAML (with the recipe's limits); the text itself when YAML refuses it,
    so validation then says what is expected there."""
    if not raw.strip():
        return ""
    try:
        return parse_yaml(raw, f"--set {text}")[0]
    except RecipeError:
        return raw


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``a.b.0.c=value`` -> (path, value); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or not all(p.strip() for p in parts):
        raise RecipeError([RecipeProblem(f"--set {text}", None, "", "expected KEY.PATH=VALUE, "
                                         "such as steps.0.rtn.bits=3")])
    path: list[str | int] = [int(p) if p.isascii() and p.isdigit() else p.strip() for p in parts]
    return path, _parse_value(raw, text)


def _override_problem(text: str, message: str) -> RecipeError:
    return RecipeError([RecipeProblem(f"--set {text}", None, "", message)])


def _apply_override(data: dict, path: list[str | int], value: Any, text: str) -> Loc | None:
    """Set ``path`` in ``data``; returns the shortest prefix the recipe did not have (None: it had it)."""
    target: Any = data
    created: Loc | None = None
    for i, part in enumerate(path):
        here = tuple(path[: i + 1])
        last = i == len(path) - 1
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                where = _field_name(here[:-1]) or "the recipe"
                raise _override_problem(text, f"{where} has no item {part} (it has {len(target)}; "
                                        "items are numbered from 0)")
        elif isinstance(target, dict):
            if target.get(part) is None:
                created = created or here
                if not last:
                    target[part] = [] if isinstance(path[i + 1], int) else {}
        else:
            where = _field_name(here[:-1])
            raise _override_problem(text, f"{where} is a single value ({str(target)[:40]!r}), not a mapping "
                                    f"or a list, so it has no field {part!r}")
        if last:
            target[part] = value
        else:
            target = target[part]
    return created


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


@dataclass(frozen=True)
class _Override:
    """A value set from the command line: what to call it, where, and what it added to the recipe."""

    label: str  # "--set steps.0.rtn.bits=5" or "--output DIR"
    path: Loc
    created: Loc | None = None  # the shortest prefix of ``path`` the recipe did not have


_NAME_HELP = "letters, digits, . _ -, starting with a letter or digit"


class _Problems:
    """Collects located problems for one recipe file; a problem a command-line value caused is
    blamed on that value, not on a recipe line that does not contain it."""

    def __init__(self, file: str, lines: dict[Loc, int], overrides: list[_Override], default_name: str | None):
        self.file, self.lines, self.overrides, self.items = file, lines, overrides, []
        self.default_name = default_name

    def _line(self, loc: Loc) -> int | None:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None

    def _blame(self, loc: Loc) -> tuple[_Override, str] | None:
        """The override behind a problem at ``loc`` and a note to add, if one is."""
        for o in self.overrides:  # the value itself, or inside it
            if loc[: len(o.path)] == o.path:
                note = f"; the recipe has no {_field_name(o.created)}, {o.label.split()[0]} added it" \
                    if o.created else ""
                return o, note
        for o in self.overrides:  # inside something the override created
            if o.created and loc[: len(o.created)] == o.created:
                return o, f"; the recipe has no {_field_name(o.created)}, {o.label.split()[0]} created it"
        for o in self.overrides:  # a check of a whole section that holds the override
            if o.path[: len(loc)] == loc:
                line = self.lines.get(loc)
                return o, (f" (together with the recipe's {_field_name(loc) or 'fields'} at {self.file}:{line})"
                           if line else "")
        return None

    def add(self, loc: Loc, message: str) -> None:
        blamed = self._blame(loc)
        if blamed is not None:
            override, note = blamed
            self.items.append(RecipeProblem(override.label, None, _field_name(loc), message + note))
        elif self.default_name is not None and loc[:1] == ("name",):
            self.items.append(RecipeProblem(self.file, None, "name", "the recipe has no `name:` and its file name "
                                            f"{self.default_name!r} is not a valid name ({_NAME_HELP}); "
                                            "set `name:` in the recipe"))
        else:
            self.items.append(RecipeProblem(self.file, self._line(loc), _field_name(loc), message))

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
        shown = repr(err["input"])
        msg += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
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


def _read_text(path: Path, file: str) -> str:
    """The recipe file's text: UTF-8, at most MAX_RECIPE_BYTES."""
    from llmslim.data import invalid_utf8_message

    def refuse(message: str) -> RecipeError:
        return RecipeError([RecipeProblem(file, None, "", message)])

    if path.is_dir():
        raise refuse("is a folder, not a recipe file")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise refuse("recipe file not found") from None
    except OSError as exc:
        raise refuse(f"cannot read recipe: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise refuse(f"larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a small YAML file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(invalid_utf8_message(exc.start, raw[exc.start])) from None


def _apply_overrides(data: dict, overrides: list[str], output: str | Path | None) -> list[_Override]:
    applied = []
    for item in overrides:
        key_path, value = parse_override(item)
        created = _apply_override(data, key_path, value, item)
        applied.append(_Override(f"--set {item}", tuple(key_path), created))
    if output is not None:
        data["output"] = str(Path(output).resolve())
        applied.append(_Override(f"--output {output}", ("output",)))
    return applied


def load_recipe(path: str | Path, overrides: list[str] = (), output: str | Path | None = None,
                edit: typing.Callable[[dict], None] | None = None) -> Recipe:
    """Read, override, validate and resolve one recipe file. Without ``name:`` the name is the
    file's stem. ``edit`` (a search trial's hook) changes the raw data after the overrides."""
    path = Path(path)
    file = str(path)
    data, lines = parse_yaml(_read_text(path, file), file)
    if not isinstance(data, dict):
        raise RecipeError([RecipeProblem(file, 1, "", "a recipe is a YAML mapping (version, name, model, steps, ...)")])
    applied = _apply_overrides(data, list(overrides), output)
    if edit is not None:
        edit(data)
    default_name = path.stem if "name" not in data else None
    if default_name is not None:
        data["name"] = default_name
    problems = _Problems(file, lines, applied, default_name)
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
