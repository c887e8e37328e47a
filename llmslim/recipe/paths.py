"""Resolve a validated recipe's paths against its folder and check that what
it names exists, before any model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from llmslim.data import check_dataset, parse_dataset
from llmslim.gguf import gguf_file_problem, is_gguf_ref
from llmslim.recipe.model_checks import check_model_inputs
from llmslim.recipe.output_checks import check_output_path
from llmslim.recipe.quant_checks import check_quant_targets
from llmslim.recipe.schema import Recipe

__all__ = ["resolve_paths", "looks_local"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_local(model: str, base_dir: Path) -> bool:
    return model.startswith((".", "/", "~")) or (base_dir / model).exists()


def _resolve_dataset(spec: str, base_dir: Path, loc: tuple, add: Callable) -> str:
    ds = parse_dataset(spec, base_dir)
    why = check_dataset(ds)
    if why:
        add(loc, why)
    return ds.spec()


def index_is_not_last(index: int, recipe: Recipe) -> bool:
    return index != len(recipe.steps) - 1


def _cross_checks(recipe: Recipe, add: Callable) -> None:
    for i, step in enumerate(recipe.steps):
        if step.NEEDS_CALIBRATION and recipe.calibration is None:
            add(("steps", i, step.STEP_NAME), f"step {step.STEP_NAME!r} needs a `calibration:` section")
        packed = getattr(step, "format", None) == "gptq"
        if packed and index_is_not_last(i, recipe):
            add(("steps", i, step.STEP_NAME, "format"),
                "a step that packs the weights (format: gptq) must be the last step; use format: dense before others")
        why = step.stream_problem()
        if recipe.memory.mode == "streamed" and why:
            add(("steps", i, step.STEP_NAME), f"cannot run with memory.mode: streamed (one decoder layer at a time): "
                f"{why}; use memory.mode: resident or auto")
    b, ev = recipe.budgets, recipe.evaluate
    if (b.max_perplexity_increase is not None or b.max_perplexity is not None) and ev.perplexity is None:
        add(("budgets",), "perplexity budgets need `evaluate.perplexity`")
    if b.min_decode_tokens_per_s is not None and ev.latency is None:
        add(("budgets", "min_decode_tokens_per_s"), "needs `evaluate.latency`")
    if b.max_energy_j_per_token is not None and ev.latency is None:
        add(("budgets", "max_energy_j_per_token"), "needs `evaluate.latency` (energy is measured while decoding)")


def _check_prune_targets(recipe: Recipe, model: str, add: Callable) -> None:
    """Pruning targets only the model's config can judge (whole GQA groups, sizes, the family), checked
    when the model is a local folder; otherwise they are checked when the step runs. A step whose targets
    are all zero, or that rounds to no change on this model, is refused: it would only rewrite the model."""
    steps = [(i, step) for i, step in enumerate(recipe.steps) if step.STEP_NAME == "prune"]
    zero = {i for i, s in steps if not any(getattr(t, "keep", t) for t in (s.heads, s.mlp, s.layers))}
    for i in sorted(zero):
        add(("steps", i, "prune"), "removes nothing (every target is 0); set heads, mlp or layers")
    config_file = Path(model) / "config.json"
    if not steps or not Path(model).is_absolute() or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # reported when the model is loaded
    from llmslim.prune.families import model_shape
    from llmslim.prune.shapes import TargetError, plan_pruning

    for i, step in steps:
        try:
            plan = plan_pruning(model_shape(config), step)
        except TargetError as exc:
            add(("steps", i, "prune", exc.field), str(exc))
        except ValueError as exc:
            add(("steps", i, "prune"), str(exc))
        except (KeyError, TypeError) as exc:
            add(("steps", i, "prune"), f"{config_file}: cannot read the model's sizes ({type(exc).__name__}: {exc})")
        else:
            if plan.noop and i not in zero:
                why = "; ".join(plan.notes) or "the targets equal the model's sizes"
                add(("steps", i, "prune"), f"removes nothing on this model ({why}); set heads, mlp or layers")


def _resolve_model_ref(ref: str, base_dir: Path, loc: tuple, what: str, add: Callable) -> str:
    """A model folder made absolute and checked, or a hub id checked for form."""
    if is_gguf_ref(ref):  # a GGUF file: local only, its header read (llmslim/gguf.py)
        path = (base_dir / Path(ref).expanduser()).resolve()
        why = gguf_file_problem(path, what)
        if why:
            add(loc, why)
        return str(path)
    if looks_local(ref, base_dir):
        path = (base_dir / Path(ref).expanduser()).resolve()
        if not path.is_dir():
            add(loc, f"{what} folder not found: {path}")
        elif not (path / "config.json").is_file():
            add(loc, f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if not _HUB_ID.match(ref):
        add(loc, f"{ref!r} is neither an existing folder nor a hub id such as 'org/name'")
    return ref


def _resolve_distill(recipe: Recipe, base_dir: Path, add: Callable) -> list:
    """Steps with the distill steps' datasets and teacher folder made absolute (and checked)."""
    steps = list(recipe.steps)
    for i, step in enumerate(steps):
        # sparsify/prune schedules: their `recover:` block is a distill config (issue 14)
        if getattr(step, "recover", None) is not None:
            recover = _resolve_distill_config(step.recover, ("steps", i, step.STEP_NAME, "recover"), base_dir, add)
            steps[i] = step = step.model_copy(update={"recover": recover})
        if step.STEP_NAME != "distill":
            continue
        steps[i] = _resolve_distill_config(step, ("steps", i, "distill"), base_dir, add)
    return steps


def _resolve_distill_config(step, loc: tuple, base_dir: Path, add: Callable):
    """A distill config with its datasets and teacher folder made absolute (and checked)."""
    update = {"dataset": _resolve_dataset(step.dataset, base_dir, loc + ("dataset",), add)}
    if step.eval_dataset is not None:
        update["eval_dataset"] = _resolve_dataset(step.eval_dataset, base_dir, loc + ("eval_dataset",), add)
    if step.teacher != "original":
        update["teacher"] = _resolve_model_ref(step.teacher, base_dir, loc + ("teacher",), "teacher", add)
    return step.model_copy(update=update)


def resolve_paths(recipe: Recipe, base_dir: Path, add: Callable) -> Recipe:
    """A copy of ``recipe`` with absolute paths; problems go to ``add(loc, msg)``."""
    update: dict = {"model": _resolve_model_ref(recipe.model, base_dir, ("model",), "model", add)}
    if recipe.calibration is not None:
        ds = _resolve_dataset(recipe.calibration.dataset, base_dir, ("calibration", "dataset"), add)
        update["calibration"] = recipe.calibration.model_copy(update={"dataset": ds})
    if recipe.evaluate.perplexity is not None:
        ppl = recipe.evaluate.perplexity
        ds = _resolve_dataset(ppl.dataset, base_dir, ("evaluate", "perplexity", "dataset"), add)
        update["evaluate"] = recipe.evaluate.model_copy(update={"perplexity": ppl.model_copy(update={"dataset": ds})})
    update["steps"] = _resolve_distill(recipe, base_dir, add)
    out = Path(recipe.output).expanduser()
    update["output"] = str((out if out.is_absolute() else base_dir / out).resolve())
    if recipe.memory.offload_folder is not None:
        offload = Path(recipe.memory.offload_folder).expanduser()
        offload = str((offload if offload.is_absolute() else base_dir / offload).resolve())
        update["memory"] = recipe.memory.model_copy(update={"offload_folder": offload})
    _cross_checks(recipe, add)
    _check_prune_targets(recipe, update["model"], add)
    resolved = recipe.model_copy(update=update)
    check_output_path(resolved, base_dir, add)
    check_model_inputs(resolved, add)
    check_quant_targets(resolved, add)
    return resolved
