"""Step configurations: one strict pydantic model per recipe step.

Each class is the options of one step, named by ``STEP_NAME``. The explicit
``STEP_CONFIGS`` table maps a step's name in a recipe to its class; the
handlers that run them live in :mod:`llmslim.steps`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["StepConfig", "RtnConfig", "STEP_CONFIGS"]

DEFAULT_IGNORE = ["lm_head"]


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

    Applied as quantize-dequantize: the saved checkpoint is a plain dense model
    whose weights lie on the quantization grid. It is the baseline GPTQ is
    measured against.

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

    _group = field_validator("group_size")(_check_group_size)


STEP_CONFIGS: dict[str, type[StepConfig]] = {
    RtnConfig.STEP_NAME: RtnConfig,
}
