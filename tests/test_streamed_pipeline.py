"""`memory: {mode: streamed}` end to end: the same checkpoint tensors and the
same perplexities as the resident run, never more than one decoder layer off
the meta device, the report says streamed per phase, latency is skipped with
its reason, steps that cannot stream are refused before anything runs, and a
streamed run resumes from its step checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import llmslim.pipeline
import llmslim.stream_run
from llmslim.cli import app
from llmslim.streaming import LazyModel, is_materialised
from tests.test_streaming import _tensors

runner = CliRunner()
GPTQ = "  - gptq: {bits: 4, group_size: 32}"
TWO_STEPS = "  - rtn: {bits: 8, group_size: 32, format: dense}\n  - gptq: {bits: 4, group_size: 32}"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def layer_census(monkeypatch):
    """At every decoder-layer load of any streamed model: how many layers hold data."""
    seen: list[int] = []
    real = LazyModel.load_layer

    def load_layer(self, index, device):
        layer = real(self, index, device)
        seen.append(sum(is_materialised(layer) for layer in self.layers))
        return layer

    monkeypatch.setattr(LazyModel, "load_layer", load_layer)
    return seen


def _report(workdir, name):
    return json.loads((workdir / "out" / name / "report.json").read_text())


def test_streamed_gptq_equals_resident(local_model, recipe_writer, workdir, layer_census):
    resident = recipe_writer(local_model, name="resident", steps=GPTQ, output="./out/resident",
                             extra="memory: {{mode: resident}}")
    streamed = recipe_writer(local_model, name="streamed", steps=GPTQ, output="./out/streamed",
                             extra="memory: {{mode: streamed}}")
    assert invoke("run", resident, "--quiet").exit_code == 0
    assert layer_census == []  # the resident run loads the model the usual way
    result = invoke("run", streamed, "--quiet")
    assert result.exit_code == 0, result.output
    # baseline, the gptq step and the result's evaluation each went through both layers, one at a time
    assert layer_census == [1, 1] * 3
    ours, theirs = _tensors(workdir / "out" / "streamed"), _tensors(workdir / "out" / "resident")
    assert sorted(ours) == sorted(theirs) and any(k.endswith(".qweight") for k in ours)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    a, b = _report(workdir, "streamed"), _report(workdir, "resident")
    for which in ("baseline", "result"):
        assert a[which]["perplexity"] == pytest.approx(b[which]["perplexity"], rel=1e-4)
        assert a[which]["size_bytes"] == b[which]["size_bytes"]
        assert a[which]["parameters"] == b[which]["parameters"]
        assert a[which]["decode_tokens_per_s"] is None and "resident" in a[which]["latency_unavailable_reason"]
        assert b[which]["decode_tokens_per_s"] > 0
    assert a["result"]["linear_kernel"] == b["result"]["linear_kernel"]
    assert a["steps"][0]["changed"]["modules_quantized"] == b["steps"][0]["changed"]["modules_quantized"]
    phases = {p["phase"]: p for p in a["memory"]["phases"]}
    assert set(phases) == {"load", "baseline", "step 1 gptq", "evaluate"}
    assert all(p["mode"] == "streamed" for p in phases.values())
    assert all(p["mode"] == "resident" for p in b["memory"]["phases"])
    assert phases["step 1 gptq"]["measured_seconds"] is not None
    config = json.loads((workdir / "out" / "streamed" / "config.json").read_text())
    assert config == json.loads((workdir / "out" / "resident" / "config.json").read_text())


def test_streamed_prune_then_gptq_equals_resident(local_model, recipe_writer, workdir, layer_census):
    """Pruned and quantized end to end without the model ever resident: the checkpoint, the sizes and the
    perplexities of the resident run."""
    steps = "  - prune: {heads: 0.5, mlp: 0.25}\n  - sparsify: {method: wanda, sparsity: 0.5}\n" + GPTQ
    for mode in ("resident", "streamed"):
        recipe = recipe_writer(local_model, name=mode, steps=steps, output=f"./out/{mode}",
                               extra=f"memory: {{{{mode: {mode}}}}}")
        result = invoke("run", recipe, "--quiet")
        assert result.exit_code == 0, result.output
    assert layer_census == [1, 1] * 5  # baseline, three steps, evaluation: one layer at a time
    ours, theirs = _tensors(workdir / "out" / "streamed"), _tensors(workdir / "out" / "resident")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    a, b = _report(workdir, "streamed"), _report(workdir, "resident")
    assert a["result"]["perplexity"] == pytest.approx(b["result"]["perplexity"], rel=1e-4)
    assert a["result"]["parameters"] == b["result"]["parameters"] < a["baseline"]["parameters"]
    assert a["steps"][1]["changed"]["model_sparsity"] == pytest.approx(b["steps"][1]["changed"]["model_sparsity"])
    assert [p["mode"] for p in a["memory"]["phases"]] == ["streamed"] * 6


def test_a_step_that_cannot_stream_is_refused_at_validation(local_model, recipe_writer, workdir, layer_census):
    recipe = recipe_writer(local_model, name="pruned", steps="  - rtn: {bits: 8, format: dense}\n"
                           "  - prune: {mlp: 0.25, layers: 1}", output="./out/pruned",
                           extra="memory: {{mode: streamed}}")
    for command in ("validate", "run"):
        result = invoke(command, recipe, "--quiet") if command == "run" else invoke(command, recipe)
        assert result.exit_code == 2
        assert "pruned.yaml:13: steps[1].prune" in result.output
        assert "cannot run with memory.mode: streamed" in result.output
    assert layer_census == [] and not (workdir / "out" / "pruned").exists()


def test_a_plan_that_streams_a_resident_only_step_is_refused_before_loading(local_model, recipe_writer, workdir,
                                                                           monkeypatch):
    """memory.mode auto: the plan decides from the free memory; a prune step it streams is refused at run start."""
    from llmslim.memory_plan import MemoryPlan, PhasePlan

    def plan(recipe):
        names = ["load", "baseline", "step 1 prune", "evaluate"]
        return MemoryPlan(phases=tuple(PhasePlan(n, "streamed", 1, 1, None, "device", "over the device limit")
                                       for n in names))

    monkeypatch.setattr(llmslim.pipeline, "plan_for_run", plan)
    recipe = recipe_writer(local_model, name="auto", steps="  - prune: {layers: 1}", output="./out/auto")
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 2
    assert "step 1 (prune) cannot run streamed" in result.output and "over the device limit" in result.output
    assert not (workdir / "out" / "auto").exists()


def test_a_streamed_run_resumes_after_a_failed_step(local_model, recipe_writer, workdir, monkeypatch):
    recipe = recipe_writer(local_model, name="two", steps=TWO_STEPS, output="./out/two",
                           extra="memory: {{mode: streamed}}")
    real = llmslim.stream_run.apply_gptq

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(llmslim.stream_run, "apply_gptq", broken)
    assert invoke("run", recipe, "--quiet").exit_code == 1
    leftovers = list((workdir / "out").glob(".two.work/*/.step-1.tmp"))
    assert leftovers == []  # the half-written step checkpoint is removed
    monkeypatch.setattr(llmslim.stream_run, "apply_gptq", real)
    assert invoke("run", recipe, "--quiet").exit_code == 0
    report = _report(workdir, "two")
    assert [s["resumed"] for s in report["steps"]] == [True, False]
    assert report["result"]["perplexity"] > 0 and report["status"] == "passed"
    again = invoke("run", recipe, "--quiet")
    assert again.exit_code == 0 and _report(workdir, "two")["finished_at"] == report["finished_at"]


def test_phases_follow_the_plan_one_by_one(local_model, recipe_writer, workdir, monkeypatch, layer_census):
    """A plan may keep some phases resident: a prune step loads the model and is saved as usual, the gptq
    step after it streams from the pruned checkpoint, and the result is evaluated resident (with latency)."""
    from llmslim.memory_plan import MemoryPlan, PhasePlan

    modes = {"load": "streamed", "baseline": "streamed", "step 1 prune": "resident", "step 2 gptq": "streamed",
             "evaluate": "resident"}
    monkeypatch.setattr(llmslim.pipeline, "plan_for_run", lambda recipe: MemoryPlan(phases=tuple(
        PhasePlan(name, mode, 1, 1, None, "host", "test plan") for name, mode in modes.items())))
    recipe = recipe_writer(local_model, name="mixed", output="./out/mixed",
                           steps="  - prune: {mlp: 0.25}\n  - gptq: {bits: 4, group_size: 32}")
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    assert layer_census == [1, 1] * 2  # the baseline and the gptq step streamed
    report = _report(workdir, "mixed")
    assert {p["phase"]: p["mode"] for p in report["memory"]["phases"]} == modes
    # the streamed baseline was not timed, but the original fits beside the resident result: both timed together
    for which in ("baseline", "result"):
        assert report[which]["decode_tokens_per_s"] > 0 and report[which]["latency_unavailable_reason"] is None
        assert report[which]["latency_interleaved_with"] in ("baseline", "result")
    config = json.loads((workdir / "out" / "mixed" / "config.json").read_text())
    assert config["intermediate_size"] == 96 and config["quantization_config"]["bits"] == 4
    assert report["result"]["parameters"] < report["baseline"]["parameters"]
