"""Options of the ``signround`` step (learned rounding, AutoRound's method).

Kept apart from :mod:`llmslim.recipe.steps`, which registers and re-exports
it; it reuses that module's group-size check and packable bit widths, so it
is imported from there after they are defined."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from llmslim.recipe.limits import MAX_COUNT
from llmslim.recipe.step_base import StepConfig
from llmslim.recipe.steps import _LOADERS_HELP, DEFAULT_IGNORE, GPTQ_LOADERS, PACKABLE_BITS, _check_group_size

__all__ = ["SignroundConfig"]


class SignroundConfig(StepConfig):
    """Learned rounding (SignRound, the method of AutoRound): for each decoder
    layer, every linear's rounding offsets (in [-0.5, 0.5]) and per-group
    clipping of its range (factors in [0.5, 1]) are optimised by signed
    gradient descent on the layer's output error, through the layer-by-layer
    calibration loop. The start is round-to-nearest, or with ``start: gptq``
    the layer's GPTQ result (GPTQ's grid is kept, and each offset moves at
    most 0.5 either way from the value GPTQ rounded).
    The target is the full-precision layer on the inputs the quantized layer
    gets (``target: layer``), or the full-precision model's own output of
    that layer (``target: model``, AutoRound's reference, which lets a layer
    make up for the error of those before it). The report gives each layer's
    relative output error at the start and after.

    Sample YAML::

        steps:
          - signround: {bits: 3, group_size: 128, sym: false, iters: 200, start: gptq, target: model,
                        format: gptq}
    """

    STEP_NAME: ClassVar[str] = "signround"
    NEEDS_CALIBRATION: ClassVar[bool] = True

    bits: int = Field(4, ge=2, le=8, description="bits per weight, 2 to 8 (format gptq: 2, 3, 4 or 8)")
    group_size: int = Field(128, description="columns sharing a scale (a partial last group where it does not "
                            "divide a width); -1 = per output channel")
    sym: bool = Field(True, description="symmetric grid around zero (one clipping factor per group, else two)")
    iters: int = Field(200, ge=1, le=MAX_COUNT, description="signed-gradient steps per decoder layer, one batch "
                       "of calibration windows each")
    lr: float | None = Field(None, gt=0, le=1, description="initial step size, decaying linearly to 0 "
                             "(default 1/iters)")
    batch_size: int = Field(8, ge=1, le=MAX_COUNT, description="calibration windows per step")
    start: Literal["nearest", "gptq"] = Field(
        "nearest", description="where the rounding starts: round-to-nearest, or GPTQ (the gptq step's defaults)")
    target: Literal["layer", "model"] = Field(
        "layer", description="layer: the full-precision layer on the quantized model's inputs; model: the "
        "full-precision model's own output of the layer")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="module-name patterns (fnmatch) left in full precision")
    format: Literal["gptq", "dense"] = Field(
        "dense", description="dense: quantize-dequantize, plain checkpoint; gptq: packed low-bit checkpoint")
    loaders: list[GPTQ_LOADERS] = Field(default_factory=list, description=_LOADERS_HELP)

    _group = field_validator("group_size")(_check_group_size)

    @model_validator(mode="after")
    def _packable(self) -> "SignroundConfig":
        if self.format == "gptq" and self.bits not in PACKABLE_BITS:
            raise ValueError(f"format gptq packs 2, 3, 4 or 8 bits, not {self.bits}; use format: dense")
        return self

    @property
    def step_size(self) -> float:
        """``lr``, or ``1 / iters`` when not given."""
        return self.lr if self.lr is not None else 1.0 / self.iters
