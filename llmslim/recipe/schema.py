"""The recipe (version 1) as strict pydantic models.

Sample YAML::

    version: 1
    name: w4-rtn
    model: ./models/my-llama
    dtype: float32
    device: auto
    seed: 0
    calibration: {dataset: text:./data/train.txt, samples: 64, seqlen: 256}
    steps:
      - rtn: {bits: 4, group_size: 128, sym: true}
    evaluate:
      perplexity: {dataset: text:./data/test.txt, seqlen: 256}
      latency: {prompt_tokens: 64, new_tokens: 32, repeats: 3}
    budgets:
      max_perplexity_increase: 5%
      max_size_mb: 200
    output: ./out/w4-rtn
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, field_validator
from pydantic import model_validator

from llmslim.recipe.limits import MAX_COUNT, MAX_SAMPLES, MAX_SEED, MAX_SEQLEN
from llmslim.recipe.steps import StepConfig
from llmslim.shards import DEFAULT_MAX_SHARD_SIZE, parse_size

__all__ = [
    "Recipe",
    "CalibrationConfig",
    "EvaluateConfig",
    "PerplexityConfig",
    "LatencyConfig",
    "BudgetsConfig",
    "parse_fraction",
    "SearchConfig",
    "SampleConfig",
    "ObjectiveConfig",
    "RangeSpec",
    "MemoryConfig",
]

DATASET_KINDS = ("text", "jsonl", "builtin", "hf")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def parse_fraction(value: object) -> object:
    """``"5%"`` -> 0.05; a bare number is already a fraction (0.05 = 5%)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", value)
        if not match:
            raise ValueError(f"expected a percentage such as '5%' or a fraction such as 0.05, got {value!r}")
        return float(match.group(1)) / 100.0
    return value


Fraction = Annotated[float, BeforeValidator(parse_fraction), Field(ge=0)]


def _check_dataset(spec: str) -> str:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in DATASET_KINDS or not rest:
        raise ValueError(
            f"dataset {spec!r} must be one of text:PATH, jsonl:PATH#field, builtin:NAME, hf:ID[:config]:split"
        )
    if kind == "jsonl" and "#" not in rest:
        raise ValueError(f"dataset {spec!r}: jsonl needs the field to read, as jsonl:PATH#field")
    return spec


class CalibrationConfig(Strict):
    """Text the calibrated steps (gptq, prune) see: random windows of tokens."""

    dataset: str
    samples: int = Field(128, gt=0, le=MAX_SAMPLES, description="number of windows")
    seqlen: int = Field(2048, gt=0, le=MAX_SEQLEN, description="tokens per window")

    _ds = field_validator("dataset")(_check_dataset)


class PerplexityConfig(Strict):
    dataset: str
    seqlen: int = Field(2048, gt=1, le=MAX_SEQLEN)
    batch_size: int = Field(1, gt=0, le=MAX_COUNT)
    max_windows: int | None = Field(None, gt=0, le=MAX_COUNT, description="evaluate only the first N windows")

    _ds = field_validator("dataset")(_check_dataset)


class LatencyConfig(Strict):
    prompt_tokens: int = Field(64, gt=0, le=MAX_SEQLEN)
    new_tokens: int = Field(32, gt=0, le=MAX_SEQLEN)
    repeats: int = Field(3, gt=0, le=MAX_COUNT)
    warmup: int = Field(1, ge=0, le=MAX_COUNT)


class EvaluateConfig(Strict):
    perplexity: PerplexityConfig | None = None
    latency: LatencyConfig | None = None
    energy: bool = Field(True, description="measure energy per token during the latency runs")


class BudgetsConfig(Strict):
    """Hard limits checked on the result; a miss makes the run exit 3."""

    max_perplexity_increase: Fraction | None = Field(None, description="relative to the baseline, e.g. 5%")
    max_perplexity: float | None = Field(None, gt=0)
    max_size_mb: float | None = Field(None, gt=0)
    min_size_reduction: Fraction | None = Field(None, description="e.g. 50% = at most half the baseline size")
    max_peak_memory_mb: float | None = Field(None, gt=0)
    min_decode_tokens_per_s: float | None = Field(None, gt=0)
    max_energy_j_per_token: float | None = Field(None, gt=0)


def _size(value: object) -> object:
    """``"20GB"`` / ``"5GiB"`` / a number of bytes -> bytes (llmslim.shards.parse_size)."""
    return parse_size(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else value


Size = Annotated[int, BeforeValidator(_size), Field(gt=0)]


class MemoryConfig(Strict):
    """Memory limits and how the model is held; without the block llmslim decides from the free memory it sees."""

    max_device_memory: Size | None = Field(
        None, description="device memory llmslim may use, e.g. 20GB or 18GiB; default: what is free on the device")
    max_host_memory: Size | None = Field(
        None, description="host (CPU) memory llmslim may use, e.g. 64GB; default: MemAvailable of /proc/meminfo")
    offload_folder: str | None = Field(
        None, min_length=1, description="where a streamed run keeps layers off the device (relative to the recipe; "
                                        "never inside the model, the output or a dataset)")
    mode: Literal["auto", "resident", "streamed"] = Field(
        "auto", description="resident: the whole model on the device; streamed: decoder layers one at a time; "
                            "auto: resident when the model and its working set fit the device limit")
    max_shard_size: Size = Field(
        DEFAULT_MAX_SHARD_SIZE, description="largest safetensors shard of the output (as transformers' save_pretrained, "
                                "default 50GB); larger checkpoints are sharded with model.safetensors.index.json")


# --- the `search:` block (llmslim search RECIPE) ------------------------------------------------------

MAX_TRIALS = 1000
SearchValues = Annotated[list, Field(min_length=1, max_length=MAX_TRIALS)]


class RangeSpec(Strict):
    """A sampled numeric range; integers when both ends are integers."""

    low: float | int
    high: float | int
    log: bool = Field(False, description="sample uniformly in log space (low > 0)")

    @model_validator(mode="after")
    def _ordered(self) -> "RangeSpec":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self


class SampleConfig(Strict):
    space: dict[str, SearchValues | RangeSpec] = Field(min_length=1)
    trials: int = Field(gt=0, le=MAX_TRIALS)
    sampler: Literal["random", "tpe"] = "random"
    seed: int = Field(0, ge=0, le=MAX_SEED)


class ObjectiveConfig(Strict):
    """score = P^perplexity_exponent * (time_weight * T + energy_weight * E), each relative to the original."""

    perplexity_exponent: float = Field(1.5, ge=0, le=100)
    time: Literal["decode", "prefill", "total"] = Field("decode", description="which measured latency is T")
    time_weight: float = Field(1.0, ge=0, description="alpha")
    energy_weight: float = Field(0.0, ge=0, description="beta")
    energy: Literal["required", "optional"] = Field(
        "required", description="optional: with no energy counter, the objective uses time only")


class SearchConfig(Strict):
    grid: dict[str, SearchValues] | None = Field(None, min_length=1, description="every combination")
    sample: SampleConfig | None = None
    objective: ObjectiveConfig = ObjectiveConfig()
    select: Literal["best", "pareto"] = "best"

    @model_validator(mode="after")
    def _one_space(self) -> "SearchConfig":
        if (self.grid is None) == (self.sample is None):
            raise ValueError("give exactly one of grid: (every combination) or sample: (random or tpe trials)")
        return self


class Recipe(Strict):
    """A compression recipe, as resolved (paths absolute, defaults filled)."""

    version: Literal[1]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(min_length=1)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,4})?)$")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="0 to 2**32 - 1")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="allow loading .bin/.pt pickle weights")
    calibration: CalibrationConfig | None = None
    steps: list[SerializeAsAny[StepConfig]] = Field(min_length=1)
    evaluate: EvaluateConfig = EvaluateConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    output: str = Field(min_length=1)
    search: SearchConfig | None = Field(None, description="variants for `llmslim search`")
    memory: MemoryConfig = Field(MemoryConfig(), description="memory limits and the resident/streamed mode")

    def steps_as_yaml(self) -> list[dict]:
        """The steps in recipe form: one single-key mapping each."""
        return [{s.STEP_NAME: s.model_dump()} for s in self.steps]

    def to_plain(self) -> dict:
        """The whole recipe as plain data, steps in recipe form."""
        data = self.model_dump(mode="json")
        data["steps"] = self.steps_as_yaml()
        if data.get("search") is None:
            data.pop("search", None)
        if self.memory == MemoryConfig():
            data.pop("memory", None)  # the default block is not written (reports of older runs stay comparable)
        return data
