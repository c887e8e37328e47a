"""Checks of a recipe against the model it names, from config.json and the
weight files' headers only (no weights are loaded, the network is never used).

For the recipe's model and a distill step's own teacher: a hub id must be in
the local Hugging Face cache; the weights must be safetensors (or pickle with
``allow_pickle``), complete and intact; and every sequence length the recipe
asks for must fit the model's context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from llmslim.recipe.schema import Recipe

__all__ = ["check_model_inputs"]


def _not_cached(ref: str) -> str:
    return (f"{ref!r} is not a local folder and not in the local Hugging Face cache (validation never downloads); "
            f"download it first with `hf download {ref}`, or set it to a local model folder")


def _model_folder(ref: str, loc: tuple, add: Callable) -> Path | None:
    """The folder holding ``ref``; None when it is missing (reported here, or by resolve_paths for folders)."""
    from llmslim.gguf import is_gguf_ref
    from llmslim.modeling import cached_model_path
    from llmslim.weight_files import PICKLE_SUFFIXES

    if is_gguf_ref(ref):
        return None  # a GGUF file: its header is checked by resolve_paths (llmslim/gguf.py)
    path = Path(ref)
    if path.is_absolute():
        return path if (path / "config.json").is_file() else None
    cached = cached_model_path(ref)
    if cached is None:
        add(loc, _not_cached(ref))
    elif not any(p.name.endswith((".safetensors",) + PICKLE_SUFFIXES) for p in cached.iterdir()):
        add(loc, f"{ref!r} is in the local Hugging Face cache without its weights; download them with "
                 f"`hf download {ref}`")
        return None
    return cached


def _check_model(ref: str, loc: tuple, add: Callable, *, allow_pickle: bool, trust_remote_code: bool) -> dict | None:
    """The model's config.json after checking its weight files; None when the model cannot be used."""
    from llmslim.weight_files import weights_problem

    folder = _model_folder(ref, loc, add)
    if folder is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        add(loc, f"{folder / 'config.json'}: cannot read it ({exc})")
        return None
    why = weights_problem(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if why:
        add(loc, why)
    return config if isinstance(config, dict) else None


def _lengths(recipe: Recipe) -> list[tuple[tuple, str, int]]:
    """(location, what, tokens) of every sequence the run feeds the model."""
    out = []
    if recipe.calibration is not None:
        out.append((("calibration", "seqlen"), "seqlen", recipe.calibration.seqlen))
    ppl, latency = recipe.evaluate.perplexity, recipe.evaluate.latency
    if ppl is not None:
        out.append((("evaluate", "perplexity", "seqlen"), "seqlen", ppl.seqlen))
    if latency is not None:
        out.append((("evaluate", "latency"), f"prompt_tokens + new_tokens = {latency.prompt_tokens} + "
                    f"{latency.new_tokens}", latency.prompt_tokens + latency.new_tokens))
    for i, step in enumerate(recipe.steps):
        if step.STEP_NAME == "distill":
            out.append((("steps", i, "distill", "seqlen"), "seqlen", step.seqlen))
    return out


def _check_context(lengths: list[tuple[tuple, str, int]], config: dict, whose: str, add: Callable) -> None:
    from llmslim.prune.families import context_length

    context = context_length(config)
    if context is None:
        return  # the config names no context length: nothing to compare with
    limit, key = context
    for loc, what, tokens in lengths:
        if tokens > limit:
            add(loc, f"{what} ({tokens} tokens) is more than {whose} context of {limit} tokens "
                     f"({key} in its config.json); use at most {limit}")


def _own_teachers(recipe: Recipe) -> list[tuple[int, object]]:
    """Distill steps that load a teacher other than the recipe's model."""
    return [(i, s) for i, s in enumerate(recipe.steps)
            if s.STEP_NAME == "distill" and s.teacher != "original" and s.needs_teacher]


def check_model_inputs(recipe: Recipe, add: Callable) -> None:
    """Problems ``run`` would hit when loading the model, found before loading it."""
    config = _check_model(recipe.model, ("model",), add, allow_pickle=recipe.allow_pickle,
                          trust_remote_code=recipe.trust_remote_code)
    if config is not None:
        _check_context(_lengths(recipe), config, "the model's", add)
    for i, step in _own_teachers(recipe):
        loc = ("steps", i, "distill", "teacher")
        # the teacher is loaded without remote code (steps/distill.py)
        teacher = _check_model(step.teacher, loc, add, allow_pickle=recipe.allow_pickle, trust_remote_code=False)
        if teacher is not None:
            _check_context([(("steps", i, "distill", "seqlen"), "seqlen", step.seqlen)], teacher,
                           "the teacher's", add)
