"""From a recipe's pruning targets to sizes that keep the architecture valid.

* Heads: with grouped-query attention, ``heads`` query heads share
  ``kv_heads`` key/value heads in groups of ``g = heads / kv_heads``. A valid
  result keeps ``a`` whole groups of ``b`` query heads each (``a <= kv_heads``,
  ``b <= g``): removing whole groups (``b = g``), the same number of query
  heads from every group (``a = kv_heads``), or both. head_dim never changes.
  For Llama the kept count must also divide hidden_size: transformers'
  ``LlamaConfig`` refuses other counts even with an explicit head_dim.
* MLP: the kept intermediate size is a multiple of ``round_to`` (or unchanged).
* Layers: a count, or a fraction of the layers rounded half up; one layer at
  least always remains.

A fraction goes to the nearest valid size (a tie goes to the smaller one); an
absolute ``{keep: N}`` must be valid as given. Anything that cannot be done
raises :class:`TargetError` naming the field. No torch here: recipes are
checked against a model's ``config.json`` with these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmslim.families import ModelShape

__all__ = ["TargetError", "HeadPlan", "PrunePlan", "head_options", "plan_heads", "plan_mlp", "plan_layers",
           "plan_pruning"]


class TargetError(ValueError):
    """A pruning target that cannot be applied to this model; ``field`` is the recipe key."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(message)


@dataclass(frozen=True)
class HeadPlan:
    groups: int  # key/value heads kept
    per_group: int  # query heads kept per key/value head

    @property
    def total(self) -> int:
        return self.groups * self.per_group


@dataclass
class PrunePlan:
    heads: HeadPlan | None = None  # None: heads untouched
    mlp_keep: int | None = None  # None: MLP untouched
    drop_layers: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return self.heads is None and self.mlp_keep is None and self.drop_layers == 0


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _nearest(candidates: list[int], target: float) -> int:
    """The candidate closest to ``target``; on a tie, the smaller."""
    return min(sorted(candidates), key=lambda c: abs(c - target))


def _keep_of(target) -> int | None:
    keep = getattr(target, "keep", None)
    return None if keep is None else int(keep)


def head_options(heads: int, kv_heads: int, divides: int | None = None) -> dict[int, list[HeadPlan]]:
    """Every valid kept head count -> the ways to reach it, most heads per group first;
    with ``divides``, only counts that divide it (the hidden size, for configs that require it)."""
    if kv_heads < 1 or heads % kv_heads:
        raise TargetError("heads", f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    group = heads // kv_heads
    options: dict[int, list[HeadPlan]] = {}
    for per_group in range(group, 0, -1):
        for groups in range(1, kv_heads + 1):
            if divides is None or divides % (groups * per_group) == 0:
                options.setdefault(groups * per_group, []).append(HeadPlan(groups, per_group))
    return dict(sorted(options.items()))


def _head_rule(shape: ModelShape) -> str:
    group = shape.heads // shape.kv_heads
    rule = (f"{shape.heads} query heads share {shape.kv_heads} key/value heads in groups of {group}, so the kept "
            "count must be (kept groups) x (heads per group)")
    if shape.family.heads_divide_hidden:
        rule += f" and divide hidden_size {shape.hidden} (transformers' {shape.family.name} config requires it)"
    return rule


def plan_heads(shape: ModelShape, target, notes: list[str]) -> HeadPlan | None:
    keep = _keep_of(target)
    if keep is None and float(target) == 0:
        return None
    if shape.family.heads_unsupported:
        raise TargetError("heads", shape.family.heads_unsupported)
    options = head_options(shape.heads, shape.kv_heads, shape.hidden if shape.family.heads_divide_hidden else None)
    if keep is not None:
        if keep > shape.heads:
            raise TargetError("heads", f"keep {keep} is more than the model's {shape.heads} attention heads")
        if keep not in options:
            raise TargetError("heads", f"keep {keep} would break grouped-query attention: {_head_rule(shape)}; "
                                       f"valid counts: {', '.join(map(str, options))}")
        chosen = keep
    else:
        wanted = (1 - float(target)) * shape.heads
        chosen = _nearest(list(options), wanted)
        if chosen == shape.heads:
            notes.append(f"heads: removing {float(target):.0%} of {shape.heads} heads rounds to none "
                         f"(valid kept counts: {', '.join(map(str, options))}); heads left unchanged")
        elif chosen != wanted:
            notes.append(f"heads: {float(target):.0%} requested, {1 - chosen / shape.heads:.1%} applied "
                         f"({chosen} of {shape.heads} heads kept, the nearest valid count: {_head_rule(shape)})")
    return None if chosen == shape.heads else options[chosen][0]


def plan_mlp(shape: ModelShape, target, round_to: int, notes: list[str]) -> int | None:
    keep, size = _keep_of(target), shape.intermediate
    if keep is None and float(target) == 0:
        return None
    if keep is not None:
        if keep > size:
            raise TargetError("mlp", f"keep {keep} is more than the model's intermediate size {size}")
        if keep % round_to and keep != size:
            raise TargetError("mlp", f"keep {keep} is not a multiple of round_to {round_to}")
        return None if keep == size else keep
    if size < round_to:
        raise TargetError("mlp", f"the intermediate size {size} is smaller than round_to {round_to}; lower round_to")
    wanted = (1 - float(target)) * size
    chosen = _nearest(list(range(round_to, size + 1, round_to)) + [size], wanted)
    if chosen == size:
        notes.append(f"mlp: removing {float(target):.0%} of {size} channels rounds to none "
                     f"(multiples of round_to {round_to}); MLP left unchanged")
        return None
    if chosen != wanted:
        notes.append(f"mlp: {float(target):.0%} requested, {1 - chosen / size:.1%} applied "
                     f"({chosen} of {size} channels kept, a multiple of round_to {round_to})")
    return chosen


def plan_layers(shape: ModelShape, target, notes: list[str]) -> int:
    if isinstance(target, int):
        count = target
    else:
        count = _half_up(float(target) * shape.layers)
        if count == 0 and target > 0:
            notes.append(f"layers: {float(target):.0%} of {shape.layers} layers rounds to 0; no layer removed")
        elif count >= shape.layers:
            count = shape.layers - 1
            notes.append(f"layers: {float(target):.0%} of {shape.layers} layers capped at {count}: one must remain")
    if count >= shape.layers:
        raise TargetError("layers", f"cannot remove {count} of the model's {shape.layers} decoder layers; "
                                    "at least one must remain")
    return count


def plan_pruning(shape: ModelShape, config) -> PrunePlan:
    """The sizes ``config`` (a ``PruneConfig``) asks of ``shape``; raises :class:`TargetError`."""
    plan = PrunePlan()
    plan.heads = plan_heads(shape, config.heads, plan.notes)
    plan.mlp_keep = plan_mlp(shape, config.mlp, config.round_to, plan.notes)
    plan.drop_layers = plan_layers(shape, config.layers, plan.notes)
    return plan
