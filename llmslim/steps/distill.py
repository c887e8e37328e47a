"""The ``distill`` step: knowledge distillation from a teacher into the model.

The teacher is the recipe's input model (``teacher: original``, loaded anew
from ``ctx.model_path``) or another model folder / hub id sharing the
tokenizer. The step trains the model in place (see
:mod:`llmslim.distill.trainer`) and reports tokens, steps, time, throughput,
perplexity before and after on its evaluation windows, and the loss and
perplexity curves under ``changed["curves"]``.

With ``parallel: fsdp`` under torchrun only rank 0 reads the teacher's
weights (on the CPU when training on a GPU: it is only the source of the
shards); the other ranks build it from its config on the meta device.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from llmslim.distill.data import build_data
from llmslim.distill.distributed import world
from llmslim.distill.sharding import empty_model
from llmslim.distill.trainer import Distiller
from llmslim.errors import StepError
from llmslim.modeling import load_model
from llmslim.progress import LOGGER
from llmslim.recipe.steps import DistillConfig
from llmslim.sparse.masks import SPARSITY_MARKER
from llmslim.steps.base import StepContext, StepOutcome

__all__ = ["apply_distill", "load_teacher"]


def load_teacher(config: DistillConfig, ctx: StepContext) -> nn.Module:
    """The teacher in eval mode without gradients, in ``teacher_dtype`` (default: the recipe's)."""
    if config.teacher == "original":
        if ctx.model_path is None:
            raise StepError("distill", "teacher: original needs the recipe's input model, which is unknown here")
        ref = str(ctx.model_path)
    else:
        ref = config.teacher
    device = ctx.device
    rank, size = world()
    if config.parallel == "fsdp" and size > 1:
        if rank != 0:
            return empty_model(ref)  # the shards are filled from rank 0's weights
        device = torch.device("cpu")
    teacher = load_model(ref, config.teacher_dtype or ctx.dtype, device)
    teacher.requires_grad_(False)
    return teacher.eval()


def apply_distill(model: nn.Module, config: DistillConfig, ctx: StepContext) -> StepOutcome:
    if any(hasattr(m, "qweight") for m in model.modules()):
        raise StepError("distill", "the model holds packed quantized layers, which cannot be trained; "
                                   "distill before quantizing (or use format: dense)")
    data = build_data(config, ctx.tokenizer)
    teacher = load_teacher(config, ctx) if config.needs_teacher else None
    LOGGER.info("distill: %d steps of %d windows x %d tokens, %d training windows, evaluation on %d (%s)",
                config.total_steps, config.batch_size, config.seqlen, data.train.shape[0], data.evaluation.shape[0],
                data.eval_source)
    try:
        distiller = Distiller(model, config, data, teacher=teacher, device=ctx.device, seed=ctx.seed,
                              scratch=ctx.scratch, progress=ctx.progress,
                              keep_zeros=bool(getattr(model.config, SPARSITY_MARKER, None)))
        teacher = None  # the distiller's own reference is the only one (FSDP frees it once sharded)
        result = distiller.run()
    finally:
        del teacher
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    changed = result.summary()
    changed["teacher"] = "original" if config.teacher == "original" else config.teacher
    changed["loss_weights"] = config.loss_weights
    if getattr(model.config, SPARSITY_MARKER, None):
        changed["sparsity_kept"] = "the zeros of the earlier sparsify step stay fixed (re-applied after every step)"
    return StepOutcome(changed=changed)
