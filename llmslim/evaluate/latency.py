"""Prefill and decode throughput, with energy per decoded token.

One run = a forward pass over a prompt of ``prompt_tokens`` random token ids
(prefill), then ``new_tokens`` greedy decoding steps with the KV cache. Runs
are repeated after warm-up; each phase's tokens/s is reported as the median
run and as the 90th-percentile (slow) run. CUDA is synchronised around every
timed phase.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from llmslim.evaluate.energy import EnergyMeter
from llmslim.errors import UsageError

__all__ = ["LatencyResult", "measure_latency"]


@dataclass
class LatencyResult:
    prefill_tokens_per_s: float
    prefill_tokens_per_s_p90: float
    decode_tokens_per_s: float
    decode_tokens_per_s_p90: float
    energy_j_per_token: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@torch.no_grad()
def _one_run(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def _max_positions(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def measure_latency(model, cfg, *, seed: int, meter: EnergyMeter | None = None) -> LatencyResult:
    """Time prefill and decode; ``cfg`` is a :class:`LatencyConfig`."""
    device = next(model.parameters()).device
    limit = _max_positions(model)
    if limit is not None and cfg.prompt_tokens + cfg.new_tokens > limit:
        raise UsageError(
            f"latency: prompt_tokens + new_tokens = {cfg.prompt_tokens + cfg.new_tokens} exceeds the model's "
            f"{limit} positions"
        )
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, cfg.prompt_tokens), generator=gen).to(device)
    for _ in range(cfg.warmup):
        _one_run(model, prompt, cfg.new_tokens, device)
    prefill, decode, energy = [], [], 0.0
    use_energy = meter is not None and meter.available
    for _ in range(cfg.repeats):
        start = meter.read() if use_energy else 0.0
        p, d = _one_run(model, prompt, cfg.new_tokens, device)
        if use_energy:
            energy += meter.delta(start, meter.read())
        prefill.append(p)
        decode.append(d)
    tokens = cfg.repeats * (cfg.prompt_tokens + cfg.new_tokens)
    return LatencyResult(
        prefill_tokens_per_s=cfg.prompt_tokens / statistics.median(prefill),
        prefill_tokens_per_s_p90=cfg.prompt_tokens / _percentile(prefill, 0.9),
        decode_tokens_per_s=cfg.new_tokens / statistics.median(decode),
        decode_tokens_per_s_p90=cfg.new_tokens / _percentile(decode, 0.9),
        energy_j_per_token=(energy / tokens) if use_energy else None,
    )
