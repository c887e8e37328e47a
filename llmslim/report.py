"""report.json: its schema (pydantic), reading and writing.

The schema is versioned by ``schema_version``; ``llmslim/schemas/report.schema.json``
is generated from these models (``python -m llmslim.report``) and a test keeps
it in sync.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import model_validator  # Metrics: non-finite values become null + a reason

__all__ = [
    "SCHEMA_VERSION",
    "Metrics",
    "StepRecord",
    "BudgetResult",
    "Report",
    "PhaseMemory",
    "MemoryRecord",
    "read_report",
    "write_json_atomic",
]

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PerplexitySettings(_Model):
    dataset: str
    seqlen: int
    windows: int
    tokens: int = Field(description="tokens in the evaluated windows")
    protocol: str = "docs joined with \\n\\n, tokenized once, non-overlapping windows, tail dropped"


class LatencySettings(_Model):
    prompt_tokens: int
    new_tokens: int
    repeats: int
    warmup: int


class Metrics(_Model):
    """What one model measured. ``baseline`` and ``result`` share these keys.

    Every float is finite or null: a measured nan/inf is stored as null with its
    reason in ``invalid`` (never as a bare NaN, which is not JSON)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    perplexity: float | None = None
    perplexity_settings: PerplexitySettings | None = None
    parameters: int
    size_bytes: int = Field(description="bytes of the weights as saved (safetensors files)")
    bits_per_parameter: float
    peak_memory_bytes: int | None = Field(None, description="process RSS peak on CPU, max allocated on CUDA")
    prefill_tokens_per_s: float | None = Field(None, description="median run")
    prefill_tokens_per_s_p90: float | None = Field(None, description="at the 90th-percentile (slow) run")
    prefill_tokens_per_s_spread: float | None = Field(
        None, ge=0, description="(p90 - p10) / median of the per-run prefill times, a fraction; "
        "above 0.2 the timings are noisy; null with a single run")
    decode_tokens_per_s: float | None = None
    decode_tokens_per_s_p90: float | None = None
    decode_tokens_per_s_spread: float | None = Field(
        None, ge=0, description="(p90 - p10) / median of the per-run decode times, a fraction; "
        "above 0.2 the timings are noisy; null with a single run")
    latency_settings: LatencySettings | None = None
    latency_interleaved_with: Literal["baseline", "result"] | None = Field(
        None, description="the model timed alternately with this one in the same process; null: timed alone")
    energy_j_per_token: float | None = Field(None, description="joules over the timed runs / tokens processed")
    energy_source: str | None = None
    energy_unavailable_reason: str | None = None
    latency_unavailable_reason: str | None = Field(
        None, description="why latency was not measured although the recipe asks for it (e.g. the model does "
        "not fit the device and was evaluated layer by layer)")
    device: str
    dtype: str
    linear_kernel: str | None = Field(None, description="how quantized linears ran, when there are any")
    invalid: dict[str, str] = Field(
        default_factory=dict, description="metric -> why its measured value is null (it was not a finite number)")

    @model_validator(mode="before")
    @classmethod
    def _non_finite_to_invalid(cls, data: Any) -> Any:
        """A nan/inf (also in a report written before this rule) becomes null plus a reason."""
        if not isinstance(data, dict):
            return data
        bad = {k: v for k, v in data.items() if isinstance(v, float) and not abs(v) < float("inf")}
        if not bad:
            return data
        invalid = dict(data.get("invalid") or {})
        for key, value in bad.items():
            invalid.setdefault(key, f"{key} is {value}: not a finite number")
        return {**data, **dict.fromkeys(bad), "invalid": invalid}


class StepRecord(_Model):
    name: str
    options: dict[str, Any]
    wall_seconds: float
    peak_memory_bytes: int | None
    changed: dict[str, Any] = Field(default_factory=dict)
    layers: list[dict[str, Any]] = Field(default_factory=list)
    resumed: bool = Field(False, description="true when restored from the work folder, not run now")


class BudgetResult(_Model):
    name: str
    limit: float
    actual: float | None
    passed: bool
    note: str | None = None


class Calibration(_Model):
    dataset: str
    samples: int
    seqlen: int
    token_ids_sha256: str


class Environment(_Model):
    python: str
    torch: str
    transformers: str
    llmslim: str
    device: str
    platform: str
    # null in reports written before llmslim recorded them
    torch_threads: int | None = Field(None, description="torch.get_num_threads() during the run")
    cpu: str | None = Field(None, description="CPU model (/proc/cpuinfo model name, else platform.processor())")
    gpu: str | None = Field(None, description="CUDA device name when the run used a GPU")
    model_source: dict[str, Any] | None = Field(
        None, description="the file the input model was converted from (a GGUF file: its sha256 and tensor types)")


class PhaseMemory(_Model):
    """One phase's memory plan (from the config, before loading) beside what the run measured."""

    phase: str = Field(description="load, baseline, step N <name>, evaluate")
    mode: Literal["resident", "streamed"] = Field(description="the whole model on the device, or one layer at a time")
    activations: Literal["device", "host"] = Field(description="where the calibration activations were planned")
    estimated_device_bytes: int
    estimated_host_bytes: int
    estimated_seconds: float | None = Field(None, description="rough")
    measured_device_bytes: int | None = Field(
        None, description="peak of this phase: max allocated on CUDA, the process RSS on CPU; null when the phase "
        "did not run now (a resumed step, a cached baseline)")
    measured_host_bytes: int | None = Field(None, description="peak process RSS during this phase")
    measured_seconds: float | None = None
    reason: str = Field("", description="why this mode")


class MemoryRecord(_Model):
    """The memory plan of the run and the measured peaks, per phase."""

    device: str
    device_limit: int | None = Field(None, description="bytes the plan was made for")
    host_limit: int | None = None
    limits_from: str = Field("", description="recipe memory block, or the free memory seen at the start")
    host_base_bytes: int | None = Field(None, description="the process's RSS when the plan was made (before "
                                        "loading), counted in every host estimate")
    host_measure: str = Field("", description="how host peaks were measured (VmHWM reset per phase, or sampled RSS)")
    phases: list[PhaseMemory] = Field(default_factory=list)


class Report(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    status: Literal["passed", "budget_failed", "failed"]
    error: str | None = None
    name: str
    recipe: dict[str, Any]
    recipe_sha256: str
    fingerprint: str = Field(description="key of what determines the checkpoint: model, data, steps, device")
    evaluation_fingerprint: str | None = Field(None, description="key of the evaluate block, its data and device")
    environment: Environment
    calibration: Calibration | None = None
    baseline: Metrics | None = None
    result: Metrics | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    budgets: list[BudgetResult] = Field(default_factory=list)
    output: str
    files: dict[str, int] | None = Field(None, description="every file of the output folder but this report, "
                                         "with its size: the output is complete when they all match")
    inputs: dict[str, Any] = Field(default_factory=dict, description="content hashes of the files read, "
                                   "with the (size, mtime_ns, inode) they were taken at")
    started_at: str
    finished_at: str
    wall_seconds: float
    memory: MemoryRecord | None = Field(None, description="estimated vs measured memory per phase; null in "
                                        "reports written before llmslim planned memory")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, rename."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"  # NaN is not JSON
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)  # never through a link; umask applies
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_report(path: Path) -> Report:
    """Read a report.json, or the one inside an output folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    return Report.model_validate_json(path.read_text(encoding="utf-8"))


def json_schema() -> dict:
    return Report.model_json_schema()


if __name__ == "__main__":
    target = Path(__file__).parent / "schemas" / "report.schema.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(json_schema(), indent=2) + "\n")
    print(f"wrote {target}")
