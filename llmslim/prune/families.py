"""The family table as pruning sees it. The table itself lives in
:mod:`llmslim.families` (shared by calibration, planning, latency and
loading); this module keeps the names importable from the pruning package."""

from __future__ import annotations

from llmslim.families import FAMILIES, Family, ModelShape, context_length, family_for, model_shape, \
    unsupported_message

__all__ = ["Family", "FAMILIES", "ModelShape", "family_for", "model_shape", "unsupported_message", "context_length"]
