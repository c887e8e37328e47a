"""Iterative schedules: reach a ``prune`` or ``sparsify`` target in rounds,
recovering with distillation from the original model after each round.

Round ``r`` of ``R`` removes up to ``r/R`` of the target (of the original
sizes), then runs the step's ``recover:`` distill options (its own seed
``seed + r``, so rounds see different data orders; ``tokens`` is per round).
After every round the model's weights, its config and the rounds' records are
written to the step's scratch folder; a rerun after an interruption resumes
after the last completed round (and, inside a round's recovery, at distill's
own checkpoint), ending with the result of an uninterrupted run:

* ``sparsify`` keeps every shape, so the last round's weights are loaded;
* structured ``prune`` changes shapes, so the completed rounds' pruning is
  replayed (deterministic given the previous round's weights, which are
  loaded before each) to rebuild the shapes, each followed by loading that
  round's weights.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from llmslim.distill.runtime import write_atomic
from llmslim.errors import StepError
from llmslim.families import ModelShape, model_shape
from llmslim.progress import LOGGER
from llmslim.prune.shapes import TargetError, plan_pruning
from llmslim.recipe.steps import PruneConfig, SparsifyConfig
from llmslim.sparse.masks import SPARSITY_MARKER
from llmslim.steps.base import StepContext, StepOutcome

__all__ = ["run_sparsify_rounds", "run_prune_rounds", "apply_prune_scheduled", "sparsify_round_config",
           "prune_round_config", "ROUND_FILE"]

ROUND_FILE = "round-{}.pt"
STATE_FORMAT = 1
RoundConfig = Callable[[nn.Module, int], object]   # (current model, round 1..R) -> one round's step config
Once = Callable[[nn.Module, object, StepContext], StepOutcome]


def sparsify_round_config(config: SparsifyConfig, r: int) -> SparsifyConfig:
    """Round ``r`` of ``config.rounds``: unstructured ``r/R`` of the target sparsity; the last round is
    the target itself (its N:M pattern, when given)."""
    single = {"rounds": 1, "recover": None}
    if r == config.rounds:
        return config.model_copy(update=single)
    return config.model_copy(update={**single, "pattern": None,
                                     "sparsity": config.target_sparsity * r / config.rounds})


def _fraction_towards(original: int, final: int, current: int, r: int, rounds: int) -> float:
    """The fraction of ``current`` to remove so that ``r/rounds`` of the way from ``original`` to ``final`` is kept."""
    keep = original - (original - final) * r / rounds
    return min(max(1.0 - keep / current, 0.0), 0.999999)


def prune_round_config(config: PruneConfig, original: ModelShape, current: ModelShape, r: int) -> PruneConfig:
    """Round ``r`` of ``config.rounds``: heads, MLP channels and layers ``r/R`` of the way from the original
    sizes to those the one-shot step gives (the last round reaches them, where the current layout allows)."""
    final = plan_pruning(original, config)
    rounds = config.rounds
    heads = _fraction_towards(original.heads, final.heads.total, current.heads, r, rounds) \
        if final.heads is not None else 0.0
    mlp = _fraction_towards(original.intermediate, final.mlp_keep, current.intermediate, r, rounds) \
        if final.mlp_keep is not None else 0.0
    dropped = original.layers - current.layers
    layers = max(round(final.drop_layers * r / rounds) - dropped, 0)
    return config.model_copy(update={"heads": heads, "mlp": mlp, "layers": layers, "rounds": 1, "recover": None})


# -- the round loop ------------------------------------------------------------------------------------------------

def _identity(config, ctx: StepContext) -> dict:
    calibration = ctx.calibration
    digest = hashlib.sha256(calibration.cpu().numpy().tobytes()).hexdigest() if calibration is not None else None
    return {"format": STATE_FORMAT, "step": config.STEP_NAME, "config": config.model_dump(mode="json"),
            "seed": ctx.seed, "calibration": digest}


def _read_round(path: Path, identity: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file only costs redoing the round
        LOGGER.warning("%s: cannot read %s (%s); redoing that round", identity["step"], path, exc)
        return None
    return state if state.get("identity") == identity else None


def _completed(scratch: Path | None, identity: dict, rounds: int) -> int:
    """How many rounds are saved in ``scratch`` for this config, data and seed."""
    if scratch is None:
        return 0
    done = 0
    while done < rounds and (scratch / ROUND_FILE.format(done + 1)).is_file():
        done += 1
    while done and _read_round(scratch / ROUND_FILE.format(done), identity) is None:
        done -= 1
    return done


def _load_round(model: nn.Module, state: dict, step: str, r: int) -> None:
    own = model.state_dict()
    saved = state["model"]
    bad = [k for k in own if k not in saved or tuple(saved[k].shape) != tuple(own[k].shape)]
    if bad or set(saved) - set(own):
        raise StepError(step, f"cannot resume after round {r}: the rebuilt model does not match the saved one "
                              f"({(bad or sorted(set(saved) - set(own)))[0]}); rerun with --force to start over")
    model.load_state_dict(saved)
    marker = state["config"].get(SPARSITY_MARKER)
    if marker is not None:
        setattr(model.config, SPARSITY_MARKER, marker)


def _recover(model: nn.Module, recover, ctx: StepContext, r: int) -> dict | None:
    if recover is None:
        return None
    from llmslim.steps.distill import apply_distill

    scratch = ctx.scratch / f"recover-{r}" if ctx.scratch is not None else None
    outcome = apply_distill(model, recover, replace(ctx, scratch=scratch, seed=ctx.seed + r - 1))
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    changed = outcome.changed
    return {k: changed.get(k) for k in ("tokens", "steps", "perplexity_before", "perplexity_after", "resumed_from_step",
                                        "wall_seconds")}


def _round_record(r: int, outcome: StepOutcome, recovered: dict | None) -> dict:
    keys = ("sparsity", "target", "parameters_after", "parameters_removed_fraction", "attention_heads",
            "intermediate_size", "decoder_layers", "notes")
    record = {"round": r, **{k: outcome.changed[k] for k in keys if k in outcome.changed}}
    if recovered is not None:
        record["recover"] = recovered
    return record


def run_rounds(model: nn.Module, config, ctx: StepContext, once: Once, round_config: RoundConfig,
               reshapes: bool) -> StepOutcome:
    """Prune in ``config.rounds`` rounds with ``config.recover`` after each; resumable per round."""
    rounds, step = config.rounds, config.STEP_NAME
    identity = _identity(config, ctx)
    done = _completed(ctx.scratch, identity, rounds)
    records: list[dict] = []
    outcome = StepOutcome()
    if done:
        LOGGER.info("%s: resuming after round %d/%d from %s", step, done, rounds, ctx.scratch)
        for r in range(1, done + 1) if reshapes else [done]:
            if reshapes:
                once(model, round_config(model, r), ctx)
            state = _read_round(ctx.scratch / ROUND_FILE.format(r), identity)
            _load_round(model, state, step, r)
        records, outcome = state["records"], StepOutcome(**state["outcome"])
    for r in range(done + 1, rounds + 1):
        cfg = round_config(model, r)
        LOGGER.info("%s: round %d/%d", step, r, rounds)
        outcome = once(model, cfg, ctx)
        records.append(_round_record(r, outcome, _recover(model, config.recover, ctx, r)))
        if ctx.scratch is not None:
            ctx.scratch.mkdir(parents=True, exist_ok=True)
            payload = {"identity": identity, "round": r, "model": model.state_dict(),
                       "config": model.config.to_dict(), "records": records,
                       "outcome": {"changed": outcome.changed, "layers": outcome.layers}}
            write_atomic(payload, ctx.scratch / ROUND_FILE.format(r))
            if not reshapes and r > 1:
                (ctx.scratch / ROUND_FILE.format(r - 1)).unlink(missing_ok=True)
    changed = {**outcome.changed, "rounds": records,
               "recover_tokens_total": sum((rec.get("recover") or {}).get("tokens") or 0 for rec in records)}
    return StepOutcome(changed=changed, layers=outcome.layers)


def run_sparsify_rounds(model: nn.Module, config: SparsifyConfig, ctx: StepContext) -> StepOutcome:
    from llmslim.steps.sparsify import sparsify_once

    return run_rounds(model, config, ctx, sparsify_once, lambda _m, r: sparsify_round_config(config, r),
                      reshapes=False)


def run_prune_rounds(model: nn.Module, config: PruneConfig, ctx: StepContext) -> StepOutcome:
    from llmslim.steps.prune import apply_prune

    try:
        original = model_shape(model.config.to_dict())
        plan_pruning(original, config)
    except (TargetError, ValueError) as exc:
        raise StepError("prune", str(exc)) from None

    def round_config(current: nn.Module, r: int) -> PruneConfig:
        return prune_round_config(config, original, model_shape(current.config.to_dict()), r)

    return run_rounds(model, config, ctx, apply_prune, round_config, reshapes=True)


def apply_prune_scheduled(model: nn.Module, config: PruneConfig, ctx: StepContext) -> StepOutcome:
    """The ``prune`` step's handler: one shot, or in rounds with recovery."""
    if config.rounds > 1 or config.recover is not None:
        return run_prune_rounds(model, config, ctx)
    from llmslim.steps.prune import apply_prune

    return apply_prune(model, config, ctx)
