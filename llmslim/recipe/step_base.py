"""The base of every step's options (see :mod:`llmslim.recipe.steps`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = ["StepConfig"]


class StepConfig(BaseModel):
    """Base of every step's options. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    STEP_NAME: ClassVar[str] = ""
    NEEDS_CALIBRATION: ClassVar[bool] = False

    def stream_problem(self) -> str | None:
        """Why this step cannot run one decoder layer at a time (llmslim/stream_run.py); None when it can."""
        return f"{self.STEP_NAME} needs the whole model resident"

    def describe(self) -> str:
        """One line for plans and tables."""
        opts = ", ".join(f"{k}={v}" for k, v in self.model_dump().items())
        return f"{self.STEP_NAME}({opts})"
