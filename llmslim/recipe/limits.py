"""Upper bounds of the recipe's numbers: far above any real use, low enough that a typo
(or a hostile file) gets a validation message instead of an overflow deep inside torch."""

from __future__ import annotations

__all__ = ["MAX_SEED", "MAX_SAMPLES", "MAX_SEQLEN", "MAX_COUNT", "MAX_TOKENS"]

MAX_SEED = 2**32 - 1  # what every seeded generator (torch, numpy) accepts
MAX_SAMPLES = 1_000_000  # calibration windows
MAX_SEQLEN = 1_048_576  # tokens per window
MAX_COUNT = 2**31 - 1  # batch sizes, repeats, steps, sizes: anything that must fit an int32
MAX_TOKENS = 10**15  # a distillation budget in tokens
