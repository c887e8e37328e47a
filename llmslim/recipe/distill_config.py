"""Options of the ``distill`` step (also the ``recover:`` block of rounds).

Kept apart from :mod:`llmslim.recipe.steps`, which re-exports it, so that
each file stays readable."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from llmslim.recipe.limits import MAX_COUNT, MAX_SAMPLES, MAX_SEQLEN, MAX_TOKENS
from llmslim.recipe.step_base import StepConfig

__all__ = ["DistillConfig", "LOSS_KINDS"]


LOSS_KINDS = ("kl", "reverse_kl", "ce")
_LOSS_HELP = "kl, reverse_kl, ce, or a weighted mix such as {kl: 1.0, ce: 0.5}"


def _loss_spec(value: object) -> object:
    """``loss``: one of LOSS_KINDS, or a mapping of them to non-negative weights."""
    if isinstance(value, str):
        if value not in LOSS_KINDS:
            raise ValueError(f"unknown loss {value!r}; expected {_LOSS_HELP}")
        return value
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"an empty mix; expected {_LOSS_HELP}")
        mix = {}
        for key, weight in value.items():
            if key not in LOSS_KINDS:
                raise ValueError(f"unknown loss {key!r} in the mix; the terms are {', '.join(LOSS_KINDS)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"the weight of {key!r} must be a number of at least 0, got {weight!r}")
            mix[key] = float(weight)
        if not any(mix.values()):
            raise ValueError("every weight of the mix is 0; give at least one term a positive weight")
        return mix
    raise ValueError(f"expected {_LOSS_HELP}")


def _autocast_spec(value: object) -> object:
    # YAML 1.1 reads a bare `off`/`on` as a boolean
    if isinstance(value, bool):
        return "bf16" if value else "off"
    return value


def _dataset_spec(value: str | None) -> str | None:
    if value is None:
        return value
    from llmslim.recipe.schema import _check_dataset  # schema imports this module; resolved at call time

    return _check_dataset(value)


class DistillConfig(StepConfig):
    """Knowledge distillation: train the model (the student) to match a teacher's
    next-token distributions on a text dataset, e.g. to recover what pruning
    lost. AdamW with linear warm-up then cosine decay; resumable mid-run; data
    parallel (DDP or FSDP) when torch.distributed is initialised.

    Sample YAML::

        steps:
          - prune: {heads: 0.25, mlp: 0.25}
          - distill:
              teacher: original       # the recipe's input model, or a model folder / hub id
              dataset: text:./data/train.txt
              tokens: 2_000_000       # training budget in tokens
              seqlen: 256
              batch_size: 16          # windows per optimizer step (all ranks together)
              micro_batch_size: 4     # windows per forward pass (gradient accumulation)
              lr: 3e-4
              warmup: 0.05            # fraction of the steps
              loss: kl                # kl | reverse_kl | ce | {kl: 1.0, ce: 0.5}
              temperature: 2.0
              hidden_states: 0.0      # weight of a cosine loss on hidden states
              eval_every: 200         # steps
          - gptq: {bits: 4, group_size: 128}
    """

    STEP_NAME: ClassVar[str] = "distill"

    teacher: str = Field("original", min_length=1,
                         description="original: the recipe's input model; or a model folder or hub id")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the teacher (default: the recipe's dtype)")
    dataset: str = Field(description="training text: text:PATH, jsonl:PATH#field, builtin:NAME, hf:ID[:config]:split")
    tokens: int = Field(1_000_000, gt=0, le=MAX_TOKENS, description="training budget in tokens (steps x batch_size x seqlen)")
    seqlen: int = Field(256, ge=2, le=MAX_SEQLEN, description="tokens per training window")
    batch_size: int = Field(16, gt=0, le=MAX_SAMPLES, description="windows per optimizer step, all ranks together")
    micro_batch_size: int | None = Field(None, gt=0, le=MAX_SAMPLES, description="windows per forward pass (default: all of a "
                                         "rank's share of the batch); the rest is gradient accumulation")
    lr: float = Field(3e-4, gt=0, description="peak AdamW learning rate")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps with a linear warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only, not norms or biases)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = none")
    loss: str | dict[str, float] = Field("kl", description=_LOSS_HELP)
    temperature: float = Field(2.0, gt=0, description="softens both distributions of the KL terms (scaled by T^2)")
    hidden_states: float = Field(0.0, ge=0, description="weight of 1 - cosine between student and teacher hidden "
                                 "states (same width needed)")
    eval_every: int = Field(200, ge=0, le=MAX_COUNT, description="steps between evaluations; 0 = only before and after")
    eval_dataset: str | None = Field(None, description="evaluation text (default: a held-out slice of `dataset`)")
    eval_windows: int = Field(32, gt=0, le=MAX_SAMPLES, description="at most this many evaluation windows of seqlen tokens")
    checkpoint_every: int = Field(100, gt=0, le=MAX_COUNT, description="steps between resumable checkpoints")
    grad_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto", description="auto: bf16 autocast on CUDA devices that support it; bf16: always; off: never")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism when torch.distributed is "
                                             "initialised")

    _loss = field_validator("loss", mode="before")(_loss_spec)
    _autocast = field_validator("autocast", mode="before")(_autocast_spec)
    _datasets = field_validator("dataset", "eval_dataset")(_dataset_spec)

    @model_validator(mode="after")
    def _micro_batches(self) -> "DistillConfig":
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size}")
        return self

    @property
    def loss_weights(self) -> dict[str, float]:
        """The loss as a mix: term -> weight (zero weights dropped)."""
        mix = {self.loss: 1.0} if isinstance(self.loss, str) else dict(self.loss)
        return {k: w for k, w in mix.items() if w > 0}

    @property
    def needs_teacher(self) -> bool:
        return self.hidden_states > 0 or any(k != "ce" for k in self.loss_weights)

    @property
    def total_steps(self) -> int:
        """Optimizer steps: the token budget over the tokens of one step, rounded up."""
        per_step = self.batch_size * self.seqlen
        return -(-self.tokens // per_step)
