"""Step handlers and the explicit table from step config type to handler.

A handler is ``handler(model, config, ctx) -> StepOutcome``; it changes the
model in place. Configs live in :mod:`llmslim.recipe.steps` so that recipes
validate without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmslim.recipe.steps import DistillConfig, GptqConfig, PruneConfig, RtnConfig, SparsifyConfig, StepConfig
from llmslim.recipe.signround_config import SignroundConfig
from llmslim.recipe.awq_config import AwqConfig
from llmslim.steps.awq import apply_awq
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.steps.distill import apply_distill
from llmslim.steps.gptq import apply_gptq
from llmslim.steps.rounds import apply_prune_scheduled
from llmslim.steps.rtn import apply_rtn
from llmslim.steps.signround import apply_signround
from llmslim.steps.sparsify import apply_sparsify

__all__ = ["StepContext", "StepOutcome", "HANDLERS", "run_step"]


Handler = Callable[[torch.nn.Module, StepConfig, StepContext], StepOutcome]

HANDLERS: dict[type[StepConfig], Handler] = {
    RtnConfig: apply_rtn,
    GptqConfig: apply_gptq,
    PruneConfig: apply_prune_scheduled,   # one shot, or in rounds with recovery (llmslim/steps/rounds.py)
    DistillConfig: apply_distill,
    SparsifyConfig: apply_sparsify,
    SignroundConfig: apply_signround,
    AwqConfig: apply_awq,
}


def run_step(model: torch.nn.Module, config: StepConfig, ctx: StepContext) -> StepOutcome:
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise NotImplementedError(f"no handler registered for step {config.STEP_NAME!r}")
    return handler(model, config, ctx)
