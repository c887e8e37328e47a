"""Options of the ``awq`` step, and what the family table says about AWQ on a
model's config (torch-free: validation uses it, and so does the step).

Kept apart from :mod:`llmslim.recipe.steps`, which registers it; it reuses
that module's quantization helpers, so ``steps`` imports this module after
defining them (``llmslim.recipe`` always imports ``steps`` first).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from llmslim.families import FAMILIES, ScaleFold, family_for, model_shape
from llmslim.recipe.step_base import StepConfig
from llmslim.recipe.steps import _LOADERS_HELP, DEFAULT_IGNORE, GPTQ_LOADERS, PACKABLE_BITS, _check_group_size

__all__ = ["AwqConfig", "fold_plan", "awq_model_problem", "check_awq_steps"]


class AwqConfig(StepConfig):
    """AWQ: activation-aware scaling and clipping before quantization, through the
    shared layer-by-layer calibration loop. For each group of linears reading one
    tensor (q/k/v, gate/up, o, down) it searches per-input-channel scales
    ``mean|x|^α`` that minimise the group's quantized output error and folds them
    into the op producing that tensor (a norm, or the previous linear's rows), so
    the full-precision function is unchanged; then (``clip``) it searches a
    clipping range per weight group (q and k are not clipped, as in AWQ).

    ``format: dense`` (the default) keeps a full-precision model, ready for a
    following ``gptq`` or ``rtn`` step with the same bits and group size;
    ``format: gptq`` rounds to nearest with the searched clipping and packs.
    Before ``gptq``, ``clip: false`` is usually better: the clipping is searched
    for round-to-nearest, and GPTQ searches its own ranges and cannot undo it.

    ``rounding: gptq`` does both in one calibration pass: each candidate α is
    scored by the output error after GPTQ (the ``gptq`` step's defaults:
    act_order, static groups, mse ranges, damp 0.01) on the scaled weights, and
    the winner's GPTQ codes are packed. It implies ``format: gptq`` and no
    AWQ clipping, and costs one GPTQ solve per candidate.

    Sample YAML::

        steps:
          - awq: {bits: 3, group_size: 128, rounding: gptq}   # scales chosen for GPTQ, packed

        steps:   # the same idea in two passes: scales searched for round-to-nearest
          - awq: {bits: 3, group_size: 128, clip: false}
          - gptq: {bits: 3, group_size: 128}
    """

    STEP_NAME: ClassVar[str] = "awq"
    NEEDS_CALIBRATION: ClassVar[bool] = True

    bits: int = Field(4, ge=2, le=8, description="bits per weight the scales and clipping are searched for, 2 to 8")
    group_size: int = Field(128, description="columns sharing a scale (a partial last group where it does not "
                            "divide a width); -1 = per output channel")
    sym: bool = Field(True, description="symmetric grid around zero")
    grid: int = Field(20, ge=2, le=1000, strict=True, description="candidate exponents α = i/grid of the scale "
                      "search, and clipping ratios 1 - i/grid above 0.5")
    rounding: Literal["nearest", "gptq"] = Field(
        "nearest", description="the rounding the scales are searched for and applied with: nearest (min-max "
        "round-to-nearest), or gptq (GPTQ on the scaled weights, packed; implies format gptq, clip false)")
    clip: bool = Field(True, description="search a clipping range per weight group after scaling (rounding "
                       "nearest only)")
    duo_scaling: bool = Field(True, description="scales mean|x|^α / mean|w|^(1-α) (AutoAWQ's default); false: "
                              "mean|x|^α")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="module-name patterns (fnmatch) left in full precision")
    format: Literal["dense", "gptq"] = Field(
        "dense", description="dense: scaled and clipped full-precision weights for a following gptq/rtn step; "
        "gptq: round to nearest and pack")
    loaders: list[GPTQ_LOADERS] = Field(default_factory=list, description=_LOADERS_HELP)

    _group = field_validator("group_size")(_check_group_size)

    @model_validator(mode="before")
    @classmethod
    def _gptq_rounding_defaults(cls, data):
        if isinstance(data, Mapping) and data.get("rounding") == "gptq":
            return {"format": "gptq", "clip": False, **data}
        return data

    @model_validator(mode="after")
    def _packable(self) -> "AwqConfig":
        if self.rounding == "gptq" and self.format != "gptq":
            raise ValueError("rounding gptq packs the GPTQ codes it chose the scales for; format must be gptq "
                             "(the default with rounding gptq)")
        if self.rounding == "gptq" and self.clip:
            raise ValueError("rounding gptq searches its own ranges (GPTQ's mse search); clip applies to "
                             "rounding nearest only: remove clip or set it false")
        if self.format == "gptq" and self.bits not in PACKABLE_BITS:
            raise ValueError(f"format gptq packs 2, 3, 4 or 8 bits, not {self.bits}; use format: dense")
        return self


def awq_model_problem(cfg: Mapping) -> str | None:
    """Why AWQ cannot run on a model with this config (None when it can)."""
    family = family_for(cfg.get("model_type"))
    if family is None or not family.scale_folds:
        known = ", ".join(t for f in FAMILIES if f.scale_folds for t in f.model_types)
        return (f"awq does not support model_type {cfg.get('model_type')!r}: where each group's scales fold "
                f"(which norm or linear precedes it) is not described in llmslim/families.py; supported: {known}")
    return None


def _why_unscaled(fold: ScaleFold, cfg: Mapping, attention: str, v: str, o: str) -> str:
    if fold.prev is None:
        return fold.why_not
    if fold.needs is not None:
        key, accepted, absent = fold.needs
        if cfg.get(key, absent) not in accepted:
            return fold.why_not or f"needs {key} in {accepted}, the config has {cfg.get(key, absent)!r}"
    if fold.rows == "v":
        shape = model_shape(cfg)
        if shape.kv_heads != shape.heads:
            return (f"grouped-query attention: {attention}.{v} has {shape.kv_heads} x {shape.head_dim} value "
                    f"rows and {attention}.{o} reads {shape.heads} x {shape.head_dim} inputs; AWQ folds o's scales "
                    f"into v only when they match, so {attention}.{o} is quantized without scales")
    return ""


def fold_plan(cfg: Mapping) -> list[tuple[ScaleFold, str]]:
    """Each AWQ group of the model's family with why it is not scaled on this config ("" when it is);
    ``ValueError`` when the family is not supported (:func:`awq_model_problem`)."""
    problem = awq_model_problem(cfg)
    if problem:
        raise ValueError(problem)
    family = family_for(cfg.get("model_type"))
    return [(fold, _why_unscaled(fold, cfg, family.attention, family.v, family.o)) for fold in family.scale_folds]


def _local_config(model: str) -> dict | None:
    config_file = Path(model) / "config.json"
    if not Path(model).is_absolute() or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # reported by the model checks
    return config if isinstance(config, dict) else None


def _pairing_notes(steps: list, i: int) -> list[str]:
    """Notes about what follows an awq dense step: nothing that quantizes, or other grid settings."""
    step = steps[i]
    if step.format != "dense":
        return []
    after = [s for s in steps[i + 1:] if s.STEP_NAME in ("gptq", "rtn")]
    if not after:
        return ["format dense and no later gptq/rtn step: the result is a rescaled full-precision model"]
    nxt = after[0]
    if (nxt.bits, nxt.group_size, nxt.sym) != (step.bits, step.group_size, step.sym):
        return [f"the scales were searched for bits {step.bits}, group_size {step.group_size}, sym {step.sym} but "
                f"the {nxt.STEP_NAME} step uses {nxt.bits}, {nxt.group_size}, {nxt.sym}"]
    return []


def check_awq_steps(recipe, add: Callable, note: Callable[[str], None]) -> None:
    """Problems of the recipe's awq steps on its model (unsupported family), and notes: groups the
    model's layout leaves unscaled, with the reason, and a dense awq step without a matching
    quantizer after it. Checked when the model is a local folder; otherwise when the step runs."""
    steps = list(recipe.steps)
    found = [(i, s) for i, s in enumerate(steps) if s.STEP_NAME == AwqConfig.STEP_NAME]
    config = _local_config(recipe.model) if found else None
    for i, step in found:
        for text in _pairing_notes(steps, i):
            note(f"steps[{i}].awq: {text}")
        problem = awq_model_problem(config) if config is not None else None
        if problem:
            add(("steps", i, "awq"), problem)
        if config is None or problem or any(s.STEP_NAME == "prune" for s in steps[:i]):
            continue  # pruning before changes the head counts the plan is computed from
        for fold, why in fold_plan(config):
            if why:
                note(f"steps[{i}].awq: {', '.join(fold.linears)} not scaled: {why}")
