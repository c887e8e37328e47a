"""Step configurations: one strict pydantic model per recipe step.

Each class is the options of one step, named by ``STEP_NAME``. The explicit
``STEP_CONFIGS`` table maps a step's name in a recipe to its class; the
handlers that run them live in :mod:`llmslim.steps`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmslim.recipe.distill_config import LOSS_KINDS, DistillConfig
from llmslim.recipe.limits import MAX_COUNT, MAX_SEQLEN
from llmslim.recipe.step_base import StepConfig
from llmslim.widths import PACKABLE_BITS

__all__ = ["step_inputs", "StepConfig", "RtnConfig", "GptqConfig", "PruneConfig", "KeepCount", "DistillConfig",
           "SparsifyConfig", "SignroundConfig", "AwqConfig", "STEP_CONFIGS", "LOSS_KINDS"]

DEFAULT_IGNORE = ["lm_head"]


def _check_group_size(value: int) -> int:
    """-1 or at least 8. It need not divide the layer widths: the last group of a layer is then partial
    (the standard GPTQ layout), and a group size above a width makes that layer per-channel."""
    if value == -1 or value >= 8:
        return value
    raise ValueError("must be -1 (one group per output channel) or a group size of at least 8")


GPTQ_LOADERS = Literal["llmslim", "transformers", "vllm-marlin", "vllm-cpu"]
_LOADERS_HELP = ("loaders that must run the packed checkpoint; validation refuses settings or widths they "
                 "cannot take (llmslim/recipe/quant_checks.py)")


class RtnConfig(StepConfig):
    """Round-to-nearest, group-wise weight quantization of the decoder's linear layers.

    With ``format: gptq`` (the default; bits 2, 3, 4 or 8) the result is
    packed in the standard GPTQ format, like the ``gptq`` step's; with
    ``format: dense`` it is applied as quantize-dequantize and the checkpoint
    stays a plain dense model whose weights lie on the quantization grid.
    It is the baseline GPTQ is measured against.

    Sample YAML::

        steps:
          - rtn: {bits: 4, group_size: 128, sym: true}
    """

    STEP_NAME: ClassVar[str] = "rtn"

    def stream_problem(self) -> str | None:
        return None

    bits: int = Field(4, ge=2, le=8, description="bits per weight, 2 to 8")
    group_size: int = Field(128, description="columns sharing a scale (a partial last group where it does not "
                            "divide a width); -1 = per output channel")
    sym: bool = Field(True, description="symmetric grid around zero")
    scale_search: Literal["minmax", "mse"] = Field(
        "minmax", description="minmax range, or search the clipping ratio minimising the error"
    )
    ignore: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        description="module-name patterns (fnmatch) left in full precision",
    )
    format: Literal["gptq", "dense"] = Field(
        "gptq", description="gptq: packed low-bit checkpoint; dense: quantize-dequantize, plain checkpoint"
    )
    loaders: list[GPTQ_LOADERS] = Field(default_factory=list, description=_LOADERS_HELP)

    _group = field_validator("group_size")(_check_group_size)

    @model_validator(mode="after")
    def _packable(self) -> "RtnConfig":
        if self.format == "gptq" and self.bits not in PACKABLE_BITS:
            raise ValueError(f"format gptq packs 2, 3, 4 or 8 bits, not {self.bits}; use format: dense")
        return self


class GptqConfig(StepConfig):
    """GPTQ: layer-wise quantization that corrects each column's rounding error
    on the columns not yet quantized, using the Hessian of the layer's
    calibration inputs. Saved in the standard GPTQ checkpoint format.

    Sample YAML::

        steps:
          - gptq:
              bits: 4
              group_size: 128
              sym: true
              act_order: true
              static_groups: true
              damp: 0.01
              block_size: 128
              true_sequential: true
              scale_search: mse
              ignore: ["lm_head"]
    """

    STEP_NAME: ClassVar[str] = "gptq"
    NEEDS_CALIBRATION: ClassVar[bool] = True

    def stream_problem(self) -> str | None:
        return None

    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: int = Field(128, description="columns sharing a scale (a partial last group where it does not "
                            "divide a width); -1 = per output channel")
    sym: bool = True
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal")
    static_groups: bool | None = Field(
        None, description="group parameters fixed before act-order, keeping g_idx trivial (default: = act_order)"
    )
    damp: float = Field(0.01, gt=0, lt=1, description="fraction of the mean Hessian diagonal added to it")
    block_size: int = Field(128, ge=1, description="columns updated lazily together")
    true_sequential: bool = Field(True, description="calibrate linears fed by the same tensor after earlier ones")
    scale_search: Literal["minmax", "mse"] = "mse"
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    format: Literal["gptq", "dense"] = Field(
        "gptq", description="gptq: packed low-bit checkpoint; dense: quantize-dequantize, plain checkpoint"
    )
    loaders: list[GPTQ_LOADERS] = Field(default_factory=list, description=_LOADERS_HELP)

    _group = field_validator("group_size")(_check_group_size)

    @property
    def use_static_groups(self) -> bool:
        return self.act_order if self.static_groups is None else self.static_groups


class KeepCount(BaseModel):
    """An absolute size to keep, written ``{keep: N}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    keep: int = Field(gt=0, le=MAX_COUNT, strict=True)


_TARGET_HELP = "a fraction to remove in [0, 1), such as 0.25, or an absolute size to keep, such as {keep: 6}"


def _width_target(value: object) -> object:
    """``heads`` / ``mlp``: a fraction removed, or ``{keep: N}``."""
    if isinstance(value, KeepCount):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value < 1:
            raise ValueError("a bare number is the fraction removed and must be at least 0 and below 1 "
                             "(1 would remove everything); to give a size write {keep: N}")
        return float(value)
    if isinstance(value, dict):
        if set(value) != {"keep"}:
            raise ValueError(f"expected {{keep: N}} with the single key `keep`, got keys {sorted(map(str, value))}")
        keep = value["keep"]
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise ValueError(f"keep must be a whole number of heads or channels, got {keep!r}")
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (got {keep}): a layer cannot lose all its heads or channels")
        return KeepCount(keep=keep)
    raise ValueError(f"expected {_TARGET_HELP}")


def _layers_target(value: object) -> object:
    """``layers``: a whole count, or a fraction of the layers in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("expected a number of layers to remove (such as 2) or a fraction of them (such as 0.25)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("the number of layers removed cannot be negative")
        return value
    if not 0 <= value < 1:
        raise ValueError("a fraction of the layers must be at least 0 and below 1; a count is a whole number such as 2")
    return value


# -- iterative schedules (prune, sparsify): remove in rounds, distil between them -----------------------------------

MAX_ROUNDS = 100
_ROUNDS_HELP = ("remove the target in this many equal rounds (1/rounds of it each, of the original sizes), "
                "recovering with `recover` after each round")
_RECOVER_HELP = ("distill options (as the distill step's) run after every round, teacher: original by default; "
                 "`tokens` is the budget of each round")


def _check_rounds(config):
    if config.rounds > 1 and config.recover is None:
        raise ValueError(f"rounds: {config.rounds} needs a `recover:` distill block (the recovery between rounds); "
                         "without recovery use rounds: 1")
    return config


class PruneConfig(StepConfig):
    """Structured pruning: remove whole attention heads, MLP channels and
    decoder layers. Every layer keeps the same shape, so the result is a plain,
    smaller checkpoint of the same architecture.

    With grouped-query attention whole key/value groups go with their query
    heads, or the same number of query heads from every group; head_dim never
    changes. A fraction is rounded to the nearest valid size and the report
    says what was applied. Layers are chosen by block influence (1 - cosine
    similarity of a layer's input and output on the calibration data).

    Sample YAML::

        steps:
          - prune:
              heads: 0.25            # fraction of attention heads removed per layer, or {keep: 6}
              mlp: 0.25              # fraction of MLP intermediate channels removed, or {keep: 512}
              layers: 0              # decoder layers removed: a count (2) or a fraction (0.1)
              importance: activation # activation | magnitude | taylor
              round_to: 8            # kept MLP sizes are multiples of this
    """

    STEP_NAME: ClassVar[str] = "prune"
    NEEDS_CALIBRATION: ClassVar[bool] = True

    heads: float | KeepCount = Field(0.0, description="attention heads removed per layer: fraction or {keep: N}")
    mlp: float | KeepCount = Field(0.0, description="MLP intermediate channels removed: fraction or {keep: N}")
    layers: int | float = Field(0, le=MAX_COUNT, description="decoder layers removed: a count or a fraction")
    importance: Literal["activation", "magnitude", "taylor"] = Field(
        "activation", description="activation: calibration activations; magnitude: weight norms; "
        "taylor: |w * dL/dw| on calibration batches")
    round_to: int = Field(8, ge=1, le=MAX_SEQLEN, strict=True, description="kept MLP sizes are multiples of this")
    rounds: int = Field(1, ge=1, le=MAX_ROUNDS, strict=True, description=_ROUNDS_HELP)
    recover: "DistillConfig | None" = Field(None, description=_RECOVER_HELP)

    _width = field_validator("heads", "mlp", mode="before")(_width_target)
    _depth = field_validator("layers", mode="before")(_layers_target)

    @model_validator(mode="after")
    def _rounded_keep(self) -> "PruneConfig":
        if isinstance(self.mlp, KeepCount) and self.mlp.keep % self.round_to:
            raise ValueError(f"mlp: keep {self.mlp.keep} is not a multiple of round_to {self.round_to}; "
                             "change it or set round_to: 1")
        return _check_rounds(self)

    def stream_problem(self) -> str | None:
        """Width pruning from activation or weight scores is decided layer by layer; ranking layers for
        removal, gradients and recovery training need the whole model."""
        if self.layers:
            return "removing decoder layers ranks every layer's influence before any is removed"
        if self.importance == "taylor":
            return "taylor importance takes gradients through the whole model"
        return _rounds_problem(self)


def _rounds_problem(config) -> str | None:
    if config.rounds > 1 or config.recover is not None:
        return "recovery by distillation (rounds, recover) trains the whole model"
    return None


def _pattern_spec(value: str | None) -> str | None:
    if value is None:
        return value
    from llmslim.sparse.pattern import parse_pattern  # torch-free

    n, m = parse_pattern(value)
    return f"{n}:{m}"


class SparsifyConfig(StepConfig):
    """Per-weight pruning inside the linears of the decoder layers, through the
    shared layer-by-layer calibration loop: ``sparsity`` (the fraction of each
    output row's weights set to 0) or an N:M ``pattern`` (at most N nonzero
    weights in every M consecutive inputs, e.g. 2:4 for NVIDIA's sparse tensor
    cores). The checkpoint stays dense: dense kernels run it no faster.

    Sample YAML::

        steps:
          - sparsify:
              method: wanda        # wanda | sparsegpt | magnitude | taylor
              sparsity: 0.5        # or pattern: "2:4"
              ignore: ["lm_head"]
              rounds: 1            # > 1: reach the target in rounds, with `recover:` after each
              recover: {dataset: text:./data/train.txt, tokens: 200_000}
    """

    STEP_NAME: ClassVar[str] = "sparsify"
    NEEDS_CALIBRATION: ClassVar[bool] = True

    method: Literal["wanda", "sparsegpt", "magnitude", "taylor"] = Field(
        "wanda", description="wanda: |W|·||x||; sparsegpt: OBS removal with weight update from the Hessian; "
        "magnitude: |W|; taylor: |W·dL/dW| on calibration batches")
    sparsity: float | None = Field(None, ge=0, lt=1, description="fraction of every output row's weights removed")
    pattern: str | None = Field(None, description="N:M, e.g. \"2:4\": N weights kept in every M consecutive inputs")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="module-name patterns (fnmatch) left dense")
    damp: float = Field(0.01, gt=0, lt=1, description="sparsegpt: fraction of the mean Hessian diagonal added to it")
    block_size: int = Field(128, ge=1, le=MAX_SEQLEN, description="sparsegpt: columns updated lazily together")
    rounds: int = Field(1, ge=1, le=MAX_ROUNDS, strict=True, description=_ROUNDS_HELP)
    recover: DistillConfig | None = Field(None, description=_RECOVER_HELP)

    _pattern = field_validator("pattern")(_pattern_spec)

    @model_validator(mode="after")
    def _target(self) -> "SparsifyConfig":
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of `sparsity` (a fraction such as 0.5) and `pattern` (N:M such as "
                             "\"2:4\")")
        return _check_rounds(self)

    def stream_problem(self) -> str | None:
        if self.method == "taylor":
            return "method taylor takes gradients through the whole model"
        return _rounds_problem(self)

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        """The fraction of weights removed: ``sparsity``, or ``1 - N/M``."""
        nm = self.nm
        return self.sparsity if nm is None else 1 - nm[0] / nm[1]


PruneConfig.model_rebuild()

# after the helpers above, which it reuses (its module imports them from here)
from llmslim.recipe.signround_config import SignroundConfig  # noqa: E402
from llmslim.recipe.awq_config import AwqConfig  # noqa: E402

STEP_CONFIGS: dict[str, type[StepConfig]] = {
    RtnConfig.STEP_NAME: RtnConfig,
    GptqConfig.STEP_NAME: GptqConfig,
    PruneConfig.STEP_NAME: PruneConfig,
    DistillConfig.STEP_NAME: DistillConfig,
    SparsifyConfig.STEP_NAME: SparsifyConfig,
    SignroundConfig.STEP_NAME: SignroundConfig,
    AwqConfig.STEP_NAME: AwqConfig,
}


def step_inputs(step: StepConfig) -> tuple[list[str], list[str]]:
    """(dataset specs, teacher refs other than ``original``) that a step reads, its ``recover:``
    distillation block included: what fingerprints hash and what an output may never overwrite."""
    datasets, teachers = [], []
    for config in (step, getattr(step, "recover", None)):
        if config is None:
            continue
        datasets += [spec for spec in (getattr(config, "dataset", None), getattr(config, "eval_dataset", None)) if spec]
        teacher = getattr(config, "teacher", None)
        if teacher and teacher != "original":
            teachers.append(teacher)
    return datasets, teachers
