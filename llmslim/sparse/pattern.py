"""The ``N:M`` pattern syntax, torch-free so that recipes validate without importing torch."""

from __future__ import annotations

import re

__all__ = ["parse_pattern", "MAX_M"]

MAX_M = 256
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: ``N`` weights kept in every ``M`` consecutive inputs; ``ValueError`` otherwise."""
    match = _PATTERN.match(text)
    if match is None:
        raise ValueError(f"expected N:M such as \"2:4\" (N weights kept in every M consecutive inputs), got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= N < M (N weights kept of every M), got {n}:{m}")
    if m > MAX_M:
        raise ValueError(f"M is at most {MAX_M}, got {m}")
    return n, m
