"""The report's JSON Schema file stays in sync with the pydantic models; budgets
and measurement helpers behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmslim
from llmslim.budgets import check_budgets
from llmslim.evaluate.energy import EnergyMeter, open_energy_meter
from llmslim.evaluate.memory import PeakMemory
from llmslim.recipe.schema import BudgetsConfig
from llmslim.report import Metrics, json_schema


def test_schema_file_is_current():
    path = Path(llmslim.__file__).parent / "schemas" / "report.schema.json"
    assert json.loads(path.read_text()) == json_schema(), "run `make schema`"


def _metrics(**kw) -> Metrics:
    base = dict(parameters=1000, size_bytes=4000, bits_per_parameter=32.0, device="cpu", dtype="float32")
    return Metrics(**{**base, **kw})


def test_budgets_pass_fail_and_unmeasured():
    baseline = _metrics(perplexity=10.0, size_bytes=4_000_000)
    result = _metrics(perplexity=10.4, size_bytes=1_000_000, decode_tokens_per_s=50.0,
                      energy_unavailable_reason="no counter")
    budgets = BudgetsConfig(max_perplexity_increase="5%", max_size_mb=0.5, min_size_reduction="70%",
                            min_decode_tokens_per_s=60, max_energy_j_per_token=1.0)
    got = {b.name: b for b in check_budgets(budgets, baseline, result)}
    assert got["max_perplexity_increase"].passed and got["max_perplexity_increase"].actual == pytest.approx(0.04)
    assert not got["max_size_mb"].passed and got["max_size_mb"].actual == pytest.approx(1.0)
    assert got["min_size_reduction"].passed and got["min_size_reduction"].actual == pytest.approx(0.75)
    assert not got["min_decode_tokens_per_s"].passed
    energy = got["max_energy_j_per_token"]
    assert not energy.passed and energy.actual is None and "no counter" in energy.note


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del block
    after = PeakMemory(torch.device("cpu"))
    with after:
        pass
    assert peak.peak_bytes >= after.peak_bytes + 48 * 1024 * 1024


def test_energy_meter_is_honest_on_this_machine():
    meter = open_energy_meter(torch.device("cpu"))
    if meter.available:
        start = meter.read()
        assert meter.delta(start, meter.read()) >= 0
    else:
        assert meter.reason
    wrapped = EnergyMeter("x", lambda: 0.0, wrap_j=100.0)
    assert wrapped.delta(99.0, 1.0) == pytest.approx(2.0)
