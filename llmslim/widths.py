"""The bit widths llmslim knows, one list per concept. No torch here: recipes are validated with
these before torch is imported."""

from __future__ import annotations

__all__ = ["PACKABLE_BITS", "INT4_KERNEL_BITS"]

PACKABLE_BITS = (2, 3, 4, 8)    # what the GPTQ v1 checkpoint format packs (llmslim.quant.packing)
INT4_KERNEL_BITS = (2, 3, 4)    # what the CPU int4 kernel runs: narrower codes are 4-bit codes of a smaller range
