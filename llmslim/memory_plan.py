"""How much memory each phase of a run needs, and whether the model is held
resident on the device or streamed through it one decoder layer at a time.

Everything comes from the recipe and the model's ``config.json``: the
architecture is built on the meta device (no weight is read) to count each
decoder layer's parameters and the rest (embeddings, head, norms). For every
phase (``load``, ``baseline``, ``step N <name>``, ``evaluate``) the estimate
is the weights held plus that phase's working set (the arithmetic is in
:mod:`llmslim.memory_estimates`):

* **resident**: all weights on the device;
* **streamed**: the weights stay in the checkpoint on disk; one unit (the
  largest decoder layer, the embeddings or the head) is materialised on the
  device at a time (:mod:`llmslim.streaming`), and finished layers go to the
  output through a spooled :class:`~llmslim.shards.ShardWriter` (the
  pending shard waits on disk, not on the host).

A phase is resident when its resident estimate fits ``HEADROOM`` of the
device limit, else streamed; ``load`` is streamed when any phase is. The
calibration activations (every window's layer inputs and outputs, rotary
tables, masks) stay on the device when they fit beside what that mode holds
there, else on the host. ``memory.mode`` forces the mode of every phase.

Limits: ``memory.max_device_memory`` / ``max_host_memory`` of the recipe,
else the free memory seen now (``torch.cuda.mem_get_info`` on CUDA,
``MemAvailable`` of ``/proc/meminfo`` on the host). On a CPU run the device
*is* the host: both limits are the host's and ``device_bytes`` equals
``host_bytes`` (the process's resident set, its libraries included, which is
what the run measures there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from llmslim.memory_estimates import HEADROOM, Estimate, ModelFacts, phase_estimates
from llmslim.recipe.schema import Recipe

__all__ = ["Mode", "PhasePlan", "MemoryPlan", "ModelFacts", "plan_memory", "choose", "model_facts",
           "read_model_facts", "dataset_chars", "host_free_bytes", "device_free_bytes", "process_rss", "PhaseLog", "plan_for_run"]

Mode = Literal["resident", "streamed"]


@dataclass(frozen=True)
class PhasePlan:
    """One phase's mode and its estimated peaks (bytes; seconds rough, None when unknown)."""

    phase: str
    mode: Mode
    device_bytes: int
    host_bytes: int
    seconds: float | None
    activations: Literal["device", "host"]
    reason: str
    fits: bool = True  # False: even this mode exceeds a limit (the run will likely run out of memory)


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of every phase of a run, with the limits it was made for."""

    phases: tuple[PhasePlan, ...]
    device: str = "cpu"                 # "cpu" or "cuda"
    device_limit: int | None = None
    host_limit: int | None = None
    limits_from: str = ""               # e.g. "recipe memory block", "free memory now"
    host_base: int | None = None        # the process's resident set when planned (in every host estimate)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def phase(self, name: str) -> PhasePlan:
        for item in self.phases:
            if item.phase == name:
                return item
        raise KeyError(f"no phase {name!r} in the memory plan ({', '.join(p.phase for p in self.phases)})")

    def mode(self, phase: str) -> Mode:
        return self.phase(phase).mode

    @property
    def streamed(self) -> bool:
        return any(p.mode == "streamed" for p in self.phases)

    def to_dict(self) -> dict:
        """Plain data (the report's ``memory.plan``)."""
        return {"device": self.device, "device_limit": self.device_limit, "host_limit": self.host_limit,
                "limits_from": self.limits_from, "host_base": self.host_base, "notes": list(self.notes),
                "phases": [vars(p).copy() for p in self.phases]}


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.0f} MB"


def _fits(value: int, limit: int | None) -> bool:
    return limit is None or value <= HEADROOM * limit


def _decide(name: str, est: tuple[Estimate, Estimate], forced: str, device_limit: int | None,
            host_limit: int | None, on_cpu: bool) -> PhasePlan:
    """One phase: the mode (forced, or resident when it fits), where activations live, and why (short)."""
    resident, streamed = est
    if forced in ("resident", "streamed"):
        mode, why = forced, "memory.mode"
    elif _fits(resident.device_with_acts, device_limit):
        mode, why = "resident", "fits"
    else:
        mode, why = "streamed", f"resident needs {_mb(resident.device_with_acts)}"
    chosen = resident if mode == "resident" else streamed
    acts_on_device = chosen.activations == 0 or _fits(chosen.device_with_acts, device_limit) or on_cpu
    device = chosen.device_with_acts if acts_on_device else chosen.device_without_acts
    host = chosen.host_with_acts if (on_cpu or not acts_on_device) else chosen.host_without_acts
    if on_cpu:
        device = host = max(device, host)
    fits = _fits(device, device_limit) and _fits(host, host_limit)
    if not fits:
        why += "; OVER THE LIMIT"
    return PhasePlan(phase=name, mode=mode, device_bytes=int(device), host_bytes=int(host),
                     seconds=chosen.seconds, activations="device" if acts_on_device else "host", reason=why,
                     fits=fits)


def choose(estimates: list[tuple[str, Estimate, Estimate]], *, forced: str = "auto",
           device_limit: int | None = None, host_limit: int | None = None, device: str = "cpu",
           limits_from: str = "", notes: tuple[str, ...] = (), host_base: int | None = None) -> MemoryPlan:
    """The plan from each phase's (resident, streamed) estimates and the limits (pure)."""
    on_cpu = device == "cpu"
    if on_cpu:  # the device is the host: the tighter of the two limits holds for both
        given = [x for x in (device_limit, host_limit) if x is not None]
        device_limit = host_limit = min(given) if given else None
    phases = [_decide(name, (res, stream), forced, device_limit, host_limit, on_cpu)
              for name, res, stream in estimates]
    if any(p.mode == "streamed" for p in phases) and phases and phases[0].mode == "resident" and forced == "auto":
        name, _, stream = estimates[0]
        phases[0] = replace(_decide(name, (stream, stream), "streamed", device_limit, host_limit, on_cpu),
                            reason="a later phase is streamed")
    return MemoryPlan(phases=tuple(phases), device=device, device_limit=device_limit, host_limit=host_limit,
                      limits_from=limits_from, host_base=host_base, notes=tuple(notes))


# --- what the process sees (orchestration) -----------------------------------------------------------


def host_free_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (bytes), else psutil's available memory."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        return None


def device_free_bytes(device: str) -> int | None:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``); the host's for ``cpu``."""
    if device == "cpu":
        return host_free_bytes()
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(device.partition(":")[2] or torch.cuda.current_device())
    return int(torch.cuda.mem_get_info(index)[0])


def process_rss() -> int:
    """This process's resident set now (bytes): the interpreter and its libraries, before any weight."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def dataset_chars(spec: str | None) -> int:
    """Characters of a dataset's text, for the tokenizer's share of host memory: a text or jsonl file's
    size (no file is read), a builtin set's length; 0 for a hub dataset (unknown before download)."""
    from llmslim.data import parse_dataset

    if not spec:
        return 0
    ds = parse_dataset(spec)
    if ds.path is not None:
        return ds.path.stat().st_size if ds.path.is_file() else 0
    if ds.kind == "builtin":
        from llmslim.builtin_data import load_builtin

        return sum(len(doc) for doc in load_builtin(ds.name))
    return 0


def _text_chars(recipe: Recipe) -> tuple[int, tuple[int, ...]]:
    """(calibration + evaluation text, the text each step tokenizes itself), in characters."""
    cal = recipe.calibration.dataset if recipe.calibration is not None else None
    ppl = recipe.evaluate.perplexity.dataset if recipe.evaluate.perplexity is not None else None
    per_step = []
    for step in recipe.steps:
        distill = step if step.STEP_NAME == "distill" else getattr(step, "recover", None)
        per_step.append(dataset_chars(getattr(distill, "dataset", None)) if distill is not None else 0)
    return dataset_chars(cal) + dataset_chars(ppl), tuple(per_step)


def _plan_device(recipe: Recipe) -> str:
    """``cpu`` or ``cuda[:N]``: the recipe's device, ``auto`` as the run resolves it (without loading)."""
    if recipe.device != "auto":
        return recipe.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_facts(model, config, dtype: str) -> ModelFacts:
    """The sizes the estimates need, from a (meta-device) model and its config."""
    from llmslim.memory_estimates import facts_from_model

    return facts_from_model(model, config, dtype)


def read_model_facts(model_ref: str, dtype: str, trust_remote_code: bool) -> tuple[ModelFacts | None, str]:
    """The model's facts from its local config (never the network), and a note (e.g. weights not local)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmslim.plan import local_config

    config, note = local_config(model_ref, trust_remote_code)
    if config is None:
        return None, note
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a GPTQ checkpoint: counted as its dense architecture
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    stored = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return model_facts(model, config, stored if dtype == "auto" else dtype), note


def plan_memory(recipe: Recipe, *, free_device_bytes: int | None = None, free_host_bytes: int | None = None,
                facts: ModelFacts | None = None, base_host_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of ``recipe`` from its config alone. Limits: the recipe's ``memory:`` block, else
    ``free_*_bytes`` when given, else the free memory seen now. ``base_host_bytes`` is what the process
    holds before loading (default: its resident set now)."""
    note = ""
    if facts is None:
        facts, note = read_model_facts(recipe.model, recipe.dtype, recipe.trust_remote_code)
    device = _plan_device(recipe)
    kind = "cpu" if device == "cpu" else "cuda"
    mem = recipe.memory
    device_limit = mem.max_device_memory
    host_limit = mem.max_host_memory
    given = "recipe memory block" if device_limit is not None or host_limit is not None else ""
    if device_limit is None:
        device_limit = free_device_bytes if free_device_bytes is not None else device_free_bytes(device)
    if host_limit is None:
        host_limit = free_host_bytes if free_host_bytes is not None else host_free_bytes()
    limits_from = given or "free memory now"
    notes = tuple(n for n in (note.strip().rstrip(";"),) if n)
    if facts is None:
        return MemoryPlan(phases=(), device=kind, device_limit=device_limit, host_limit=host_limit,
                          limits_from=limits_from, notes=notes + ("no memory estimate without the config",))
    text, per_step = _text_chars(recipe)  # first: a builtin dataset is built (and kept) by reading it
    base = process_rss() if base_host_bytes is None else base_host_bytes
    estimates = phase_estimates(recipe, facts, on_cpu=kind == "cpu", base_host=base, text_chars=text,
                                step_text_chars=per_step, side_by_side_limit=device_limit)
    return choose(estimates, forced=mem.mode, device_limit=device_limit, host_limit=host_limit, device=kind,
                  limits_from=limits_from, notes=notes, host_base=base)


# --- plan beside measured (the run's report) ---------------------------------------------------------


class PhaseLog:
    """Measures the run's phases (device and host peaks, seconds) beside a plan, for the report."""

    def __init__(self, plan: MemoryPlan | None, device):
        self.plan, self.device = plan, device
        self.measured: dict[str, tuple[int, int, float]] = {}
        self.host_measure = ""

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        """Record ``phase``'s peaks and seconds (the block's last run of it wins)."""
        import time

        from llmslim.evaluate.memory import PeakMemory

        start = time.perf_counter()
        with PeakMemory(self.device) as peak:
            yield
        self.record(phase, peak.peak_bytes, peak.host_peak_bytes, time.perf_counter() - start, peak.host_method)

    def record(self, phase: str, device_bytes: int, host_bytes: int, seconds: float, method: str = "") -> None:
        self.measured[phase] = (int(device_bytes), int(host_bytes), float(seconds))
        self.host_measure = self.host_measure or method

    def report(self):
        """The report's ``memory`` record, or None without a plan."""
        from llmslim.report import MemoryRecord, PhaseMemory

        if self.plan is None:
            return None
        how = {"VmHWM": "process RSS high-water mark (VmHWM), reset per phase"}.get(self.host_measure,
                                                                                   self.host_measure)
        phases = []
        for p in self.plan.phases:
            device, host, seconds = self.measured.get(p.phase, (None, None, None))
            phases.append(PhaseMemory(phase=p.phase, mode=p.mode, activations=p.activations,
                                      estimated_device_bytes=p.device_bytes, estimated_host_bytes=p.host_bytes,
                                      estimated_seconds=None if p.seconds is None else round(p.seconds, 3),
                                      measured_device_bytes=device, measured_host_bytes=host,
                                      measured_seconds=None if seconds is None else round(seconds, 3),
                                      reason=p.reason))
        return MemoryRecord(device=self.plan.device, device_limit=self.plan.device_limit,
                            host_limit=self.plan.host_limit, limits_from=self.plan.limits_from,
                            host_base_bytes=self.plan.host_base, host_measure=how, phases=phases)


def plan_for_run(recipe: Recipe) -> MemoryPlan | None:
    """The plan at the start of a run (the process's resident set now as the host base), or None, with a
    warning, when the config cannot be planned (the run goes on without a plan)."""
    from llmslim.errors import LlmslimError
    from llmslim.progress import LOGGER

    try:
        return plan_memory(recipe)
    except (LlmslimError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        LOGGER.warning("%s: no memory plan (%s: %s)", recipe.name, type(exc).__name__, exc)
        return None
