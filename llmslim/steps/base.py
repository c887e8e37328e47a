"""What every step handler receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmslim.progress import Progress

__all__ = ["StepContext", "StepOutcome"]


@dataclass
class StepContext:
    """What a step may use besides the model and its options."""

    tokenizer: Any
    device: torch.device
    seed: int
    progress: Progress
    calibration: torch.Tensor | None = None  # [samples, seqlen] token ids
    model_path: Path | None = None  # the recipe's input model (a teacher, a reference)
    dtype: str = "auto"  # the recipe's dtype, to load other models alike
    scratch: Path | None = None  # this step's own folder in the work dir, kept until the step completes


@dataclass
class StepOutcome:
    """What a step changed (for the report) and its per-layer statistics."""

    changed: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
