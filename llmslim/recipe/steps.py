"""Step configurations: one strict pydantic model per recipe step.

Each class is the options of one step, named by ``STEP_NAME``. The explicit
``STEP_CONFIGS`` table maps a step's name in a recipe to its class; the
handlers that run them live in :mod:`llmslim.steps`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["StepConfig", "RtnConfig", "GptqConfig", "STEP_CONFIGS"]

DEFAULT_IGNORE = ["lm_head"]
PACKABLE_BITS = (2, 3, 4, 8)


class StepConfig(BaseModel):
    """Base of every step's options. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    STEP_NAME: ClassVar[str] = ""
    NEEDS_CALIBRATION: ClassVar[bool] = False

    def describe(self) -> str:
        """One line for plans and tables."""
        opts = ", ".join(f"{k}={v}" for k, v in self.model_dump().items())
        return f"{self.STEP_NAME}({opts})"


def _check_group_size(value: int) -> int:
    if value == -1 or value >= 8:
        return value
    raise ValueError("must be -1 (one group per output channel) or a group size of at least 8")


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

    bits: int = Field(4, ge=2, le=8, description="bits per weight, 2 to 8")
    group_size: int = Field(128, description="columns sharing a scale; -1 = per output channel")
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

    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight")
    group_size: int = Field(128, description="columns sharing a scale; -1 = per output channel")
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

    _group = field_validator("group_size")(_check_group_size)

    @property
    def use_static_groups(self) -> bool:
        return self.act_order if self.static_groups is None else self.static_groups


STEP_CONFIGS: dict[str, type[StepConfig]] = {
    RtnConfig.STEP_NAME: RtnConfig,
    GptqConfig.STEP_NAME: GptqConfig,
}
