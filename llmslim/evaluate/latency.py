"""Prefill and decode throughput, with energy per decoded token.

One run = a forward pass over a prompt of ``prompt_tokens`` random token ids
(prefill), then ``new_tokens`` greedy decoding steps with the KV cache. Runs
are repeated after warm-up; each phase's tokens/s is reported as the median
run and as the 90th-percentile (slow) run, with the spread of the per-run
times: (p90 - p10) / median, a fraction (0.05 = 5%). CUDA is synchronised
around every timed phase.

Two models (baseline and result) are timed in the same process, alternately
(A, B, A, B, ...) on the same prompt, so a machine that slows down or speeds
up during the measurement affects both alike. Energy is read around each
model's own runs only.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmslim.evaluate.energy import EnergyMeter
from llmslim.errors import UsageError

__all__ = ["LatencyResult", "NOISY_SPREAD", "measure_latency", "measure_latency_pair", "spread",
           "summarize_runs"]

NOISY_SPREAD = 0.2  # a spread above this makes the timings too noisy to compare

Clock = Callable[[], float]


@dataclass
class LatencyResult:
    prefill_tokens_per_s: float
    prefill_tokens_per_s_p90: float
    prefill_tokens_per_s_spread: float | None  # None with a single run: nothing to compare
    decode_tokens_per_s: float
    decode_tokens_per_s_p90: float
    decode_tokens_per_s_spread: float | None
    energy_j_per_token: float | None


@dataclass
class _Runs:
    """Per-run seconds of one model, and the joules read around its runs."""

    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    energy_j: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(seconds: list[float]) -> float:
    """(p90 - p10) / median of per-run times: 0 when every run took as long."""
    width = _percentile(seconds, 0.9) - _percentile(seconds, 0.1)
    median = statistics.median(seconds)
    if median <= 0:
        return 0.0 if width <= 0 else math.inf
    return width / median


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else math.inf


def summarize_runs(prefill: list[float], decode: list[float], cfg, energy_j: float | None) -> LatencyResult:
    """Tokens/s (median, p90 = the slow run), spreads and J/token from per-run seconds."""
    tokens = len(prefill) * (cfg.prompt_tokens + cfg.new_tokens)
    return LatencyResult(
        prefill_tokens_per_s=_rate(cfg.prompt_tokens, statistics.median(prefill)),
        prefill_tokens_per_s_p90=_rate(cfg.prompt_tokens, _percentile(prefill, 0.9)),
        prefill_tokens_per_s_spread=spread(prefill) if len(prefill) > 1 else None,
        decode_tokens_per_s=_rate(cfg.new_tokens, statistics.median(decode)),
        decode_tokens_per_s_p90=_rate(cfg.new_tokens, _percentile(decode, 0.9)),
        decode_tokens_per_s_spread=spread(decode) if len(decode) > 1 else None,
        energy_j_per_token=None if energy_j is None else energy_j / tokens,
    )


@torch.no_grad()
def _one_run(model, prompt: torch.Tensor, new_tokens: int, clock: Clock) -> tuple[float, float]:
    device = prompt.device
    _sync(device)
    t0 = clock()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    t1 = clock()
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, clock() - t1


def _max_positions(model) -> int | None:
    from llmslim.families import context_length

    config = model.config
    found = context_length(config.to_dict() if hasattr(config, "to_dict") else vars(config))
    return found[0] if found else None


def _check_positions(model, cfg) -> None:
    limit = _max_positions(model)
    if limit is not None and cfg.prompt_tokens + cfg.new_tokens > limit:
        raise UsageError(
            f"latency: prompt_tokens + new_tokens = {cfg.prompt_tokens + cfg.new_tokens} exceeds the model's "
            f"{limit} positions"
        )


def _timed_run(model, prompt: torch.Tensor, cfg, meter: EnergyMeter | None, runs: _Runs, clock: Clock) -> None:
    use_energy = meter is not None and meter.available
    start = meter.read() if use_energy else 0.0
    p, d = _one_run(model, prompt, cfg.new_tokens, clock)
    if use_energy:
        runs.energy_j += meter.delta(start, meter.read())
    runs.prefill.append(p)
    runs.decode.append(d)


def measure_latency_pair(models: dict, cfg, *, seed: int, meters: dict | None = None,
                         clock: Clock = time.perf_counter) -> dict[str, LatencyResult]:
    """Time several models (usually baseline and result) alternately on the same prompt.

    Each model is warmed up (``cfg.warmup`` runs), then the timed runs alternate
    A, B, A, B, ... until each model has ``cfg.repeats`` of them. ``meters``
    maps a model's name to its energy meter (or None). ``cfg`` is a
    :class:`LatencyConfig`.
    """
    meters = meters or {}
    for model in models.values():
        _check_positions(model, cfg)
    vocab = min(model.config.vocab_size for model in models.values())
    prompt = torch.randint(0, vocab, (1, cfg.prompt_tokens), generator=torch.Generator().manual_seed(seed))
    prompts = {name: prompt.to(next(model.parameters()).device) for name, model in models.items()}
    for name, model in models.items():
        for _ in range(cfg.warmup):
            _one_run(model, prompts[name], cfg.new_tokens, clock)
    runs = {name: _Runs() for name in models}
    for _ in range(cfg.repeats):
        for name, model in models.items():
            _timed_run(model, prompts[name], cfg, meters.get(name), runs[name], clock)
    results = {}
    for name, r in runs.items():
        meter = meters.get(name)
        energy = r.energy_j if (meter is not None and meter.available) else None
        results[name] = summarize_runs(r.prefill, r.decode, cfg, energy)
    return results


def measure_latency(model, cfg, *, seed: int, meter: EnergyMeter | None = None,
                    clock: Clock = time.perf_counter) -> LatencyResult:
    """Time prefill and decode of one model; ``cfg`` is a :class:`LatencyConfig`."""
    return measure_latency_pair({"model": model}, cfg, seed=seed, meters={"model": meter}, clock=clock)["model"]
