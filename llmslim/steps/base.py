"""What every step handler receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class StepOutcome:
    """What a step changed (for the report) and its per-layer statistics."""

    changed: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
