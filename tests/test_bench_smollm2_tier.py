"""The SmolLM2 benchmark tier's bookkeeping: rows saved as measured, resumable, merged across processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import smollm2_tier  # noqa: E402


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2_tier, "RESULTS", tmp_path)
    return tmp_path


def test_rows_are_written_as_measured_and_skipped_on_rerun(results):
    rows = smollm2_tier.Rows("quant", ["method", "ppl"])
    rows.add({"key": "baseline", "method": "baseline", "ppl": 30.5})
    saved = json.loads((results / "smollm2-quant.json").read_text())
    assert [r["key"] for r in saved["rows"]] == ["baseline"]
    assert "first 16 windows of 512 tokens" in saved["meta"]["eval"]
    assert "| baseline | 30.5 |" in (results / "smollm2-quant.md").read_text()
    again = smollm2_tier.Rows("quant", ["method", "ppl"])
    assert again.get("baseline")["ppl"] == 30.5
    assert smollm2_tier.Rows("quant", ["method"], fresh=True).get("baseline") is None


def test_rows_of_another_process_are_kept(results):
    first = smollm2_tier.Rows("quant", ["method"])
    second = smollm2_tier.Rows("quant", ["method"])
    first.add({"key": "a", "method": "a"})
    second.add({"key": "b", "method": "b"})
    first.add({"key": "c", "method": "c"})
    keys = [r["key"] for r in json.loads((results / "smollm2-quant.json").read_text())["rows"]]
    assert sorted(keys) == ["a", "b", "c"]


def test_skips_with_a_message_without_the_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smollm2_tier, "WIKITEXT", tmp_path / "absent")
    with pytest.raises(SystemExit) as stop:
        smollm2_tier.model_folder_or_skip()
    assert stop.value.code == 0
    assert "skipping:" in capsys.readouterr().out


def test_machine_records_threads_cpu_and_load():
    env = smollm2_tier.machine()
    assert env["torch_threads"] >= 1 and env["cpu"] and env["loadavg_1m"] >= 0
