"""Which variants a search tries: every combination of a grid, or trials drawn from a space by a
seeded random or TPE sampler. Pure functions of the search block (and, for TPE, of the scores so far)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

from llmslim.recipe.schema import RangeSpec, SampleConfig

__all__ = ["grid_trials", "draw_trial", "space_corners", "TPE_STARTUP"]

TPE_STARTUP = 4  # trials drawn at random before TPE models the scores
TPE_CANDIDATES = 24
TPE_GAMMA = 0.25  # the best quarter of the scored trials is "good"
DRAW_ATTEMPTS = 200


def grid_trials(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _is_int_range(spec: RangeSpec) -> bool:
    return isinstance(spec.low, int) and isinstance(spec.high, int)


def _uniform(spec: RangeSpec, rng: random.Random) -> float | int:
    if _is_int_range(spec):
        return rng.randint(spec.low, spec.high)
    if spec.log:
        return math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
    return rng.uniform(spec.low, spec.high)


def _random_value(dim, rng: random.Random):
    return rng.choice(dim) if isinstance(dim, list) else _uniform(dim, rng)


def space_corners(space: dict[str, list | RangeSpec]) -> list[dict[str, Any]]:
    """Each listed value and each range end once, the other keys at their first value: what validation
    checks when the trials themselves are not known in advance (TPE)."""
    first = {k: (v[0] if isinstance(v, list) else v.low) for k, v in space.items()}
    out = []
    for key, dim in space.items():
        for value in (dim if isinstance(dim, list) else [dim.low, dim.high]):
            trial = dict(first, **{key: value})
            if trial not in out:
                out.append(trial)
    return out


def _density(value, points: Sequence, dim) -> float:
    """A Parzen estimate at ``value`` from ``points``, with a flat prior (one pseudo-point)."""
    if isinstance(dim, list):
        return (sum(1 for p in points if p == value) + 1.0 / len(dim)) / (len(points) + 1.0)
    low, high = (math.log(dim.low), math.log(dim.high)) if dim.log else (float(dim.low), float(dim.high))
    span = high - low
    x = math.log(value) if dim.log else float(value)
    width = max(span / max(1.0, math.sqrt(len(points) + 1)), span * 0.05)
    total = 1.0 / span  # the prior, uniform over the range
    for p in points:
        c = math.log(p) if dim.log else float(p)
        total += math.exp(-0.5 * ((x - c) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    return total / (len(points) + 1.0)


def _tpe_value(key: str, dim, good: list[dict], bad: list[dict], rng: random.Random):
    """The candidate (drawn around the good trials) with the highest good/bad density ratio."""
    good_values, bad_values = [t[key] for t in good], [t[key] for t in bad]
    candidates = []
    for _ in range(TPE_CANDIDATES):
        if good_values and rng.random() < 0.8:
            centre = rng.choice(good_values)
            if isinstance(dim, list):
                candidates.append(centre)
                continue
            spread = (dim.high - dim.low) * 0.1
            value = min(max(rng.gauss(centre, spread), dim.low), dim.high)
            candidates.append(round(value) if _is_int_range(dim) else value)
        else:
            candidates.append(_random_value(dim, rng))
    return max(candidates, key=lambda v: _density(v, good_values, dim) / _density(v, bad_values, dim))


def draw_trial(sample: SampleConfig, index: int, history: list[tuple[dict, float | None]]) -> dict[str, Any]:
    """Trial ``index``: a function of the seed, the index and the trials before it (params, score), so a
    resumed search draws the same trials. Repeats of earlier trials are avoided where the space allows."""
    rng = random.Random(f"{sample.seed}:{index}")
    seen = [params for params, _ in history]
    scored = sorted(((s, p) for p, s in history if s is not None), key=lambda sp: sp[0])
    use_tpe = sample.sampler == "tpe" and len(scored) >= TPE_STARTUP
    cut = max(1, int(math.ceil(TPE_GAMMA * len(scored))))
    good, bad = [p for _, p in scored[:cut]], [p for _, p in scored[cut:]]
    trial: dict[str, Any] = {}
    for _ in range(DRAW_ATTEMPTS):
        trial = {k: (_tpe_value(k, dim, good, bad, rng) if use_tpe else _random_value(dim, rng))
                 for k, dim in sample.space.items()}
        if trial not in seen:
            return trial
    return trial
