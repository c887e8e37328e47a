"""Reruns that tell the truth: the fingerprint covers every file a recipe
reads, budgets alone are re-checked without recomputing, --force starts
clean, a broken step checkpoint is recomputed, and a failed rerun never
overwrites what the output holds."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import llmslim.pipeline
from llmslim.cli import app

runner = CliRunner()
TWO_STEPS = "  - rtn: {bits: 4, group_size: 32, format: dense}\n  - rtn: {bits: 8, group_size: 32}"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def fail_step(monkeypatch):
    """Make the step with the given index fail (the others run for real)."""
    real = llmslim.pipeline.run_step

    def arm(bits: int):
        def run_step(model, config, ctx):
            if getattr(config, "bits", None) == bits:
                raise RuntimeError("injected failure")
            return real(model, config, ctx)

        monkeypatch.setattr(llmslim.pipeline, "run_step", run_step)

    yield arm
    monkeypatch.setattr(llmslim.pipeline, "run_step", real)


def _report(workdir):
    return json.loads((workdir / "out" / "w4-rtn" / "report.json").read_text())


@pytest.mark.parametrize("edit", ["evaluation", "calibration"])
def test_editing_a_dataset_reruns(local_model, recipe_writer, workdir, edit):
    recipe = recipe_writer(local_model)
    assert invoke("run", recipe).exit_code == 0
    before = _report(workdir)
    name = {"evaluation": "test.txt", "calibration": "train.txt"}[edit]
    path = workdir / "data" / name
    path.write_text(path.read_text().replace("fox", "cat"))
    again = invoke("run", recipe)
    assert again.exit_code == 0 and "up to date" not in again.output, again.output
    after = _report(workdir)
    changed = after["baseline"]["perplexity"] != before["baseline"]["perplexity"]
    assert changed if edit == "evaluation" else after["fingerprint"] != before["fingerprint"]


def test_editing_the_distillation_data_reruns(local_model, recipe_writer, workdir):
    (workdir / "data" / "distill.txt").write_text((workdir / "data" / "train.txt").read_text())
    steps = "  - distill: {dataset: text:./data/distill.txt, tokens: 128, seqlen: 16, batch_size: 2, eval_windows: 2}"
    recipe = recipe_writer(local_model, steps=steps)
    assert invoke("run", recipe).exit_code == 0
    plot = workdir / "out" / "w4-rtn" / "distill-step-0.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "distillation curves drawn beside the checkpoint"
    assert "distill-step-0.png" in _report(workdir)["files"]
    again = invoke("run", recipe)
    assert "up to date" in again.output
    (workdir / "data" / "distill.txt").write_text("Something else entirely.\n\n" * 50)
    third = invoke("run", recipe)
    assert third.exit_code == 0 and "up to date" not in third.output, third.output


def test_budgets_alone_are_rechecked_without_recomputing(local_model, recipe_writer, workdir):
    recipe = recipe_writer(local_model)
    assert invoke("run", recipe).exit_code == 0
    weights = workdir / "out" / "w4-rtn" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    tight = invoke("run", recipe, "--set", "budgets.max_size_mb=0.001")
    assert tight.exit_code == 3 and "budgets re-checked" in tight.output, tight.output
    report = _report(workdir)
    assert report["status"] == "budget_failed" and report["budgets"][0]["limit"] == 0.001
    loose = invoke("run", recipe)
    assert loose.exit_code == 0 and "budgets re-checked" in loose.output
    assert weights.stat().st_mtime_ns == stamp


def test_a_broken_step_checkpoint_is_recomputed(local_model, recipe_writer, workdir, fail_step, monkeypatch):
    recipe = recipe_writer(local_model, steps=TWO_STEPS)
    fail_step(8)
    assert invoke("run", recipe).exit_code == 1
    work = next((workdir / "out" / ".w4-rtn.work").iterdir())
    (work / "step-0" / "model.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setattr(llmslim.pipeline, "run_step", _real_run_step())
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    assert "cannot be loaded" in result.output and "resuming" not in result.output


def _real_run_step():
    from llmslim.steps import run_step

    return run_step


def test_force_starts_clean(local_model, recipe_writer, workdir, fail_step, monkeypatch):
    recipe = recipe_writer(local_model, steps=TWO_STEPS)
    fail_step(8)
    assert invoke("run", recipe).exit_code == 1
    monkeypatch.setattr(llmslim.pipeline, "run_step", _real_run_step())
    result = invoke("run", recipe, "--force")
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output and "baseline restored" not in result.output


def test_baseline_cache_follows_the_evaluate_block(local_model, recipe_writer, workdir, fail_step):
    recipe = recipe_writer(local_model, steps=TWO_STEPS)
    fail_step(8)
    assert invoke("run", recipe).exit_code == 1
    same = invoke("run", recipe)
    assert "baseline restored" in same.output
    edited = invoke("run", recipe, "--set", "evaluate.perplexity.seqlen=16")
    assert "baseline restored" not in edited.output and "evaluating the original model" in edited.output


def test_a_failed_rerun_leaves_the_output_and_its_report(local_model, recipe_writer, workdir, fail_step):
    recipe = recipe_writer(local_model)
    assert invoke("run", recipe).exit_code == 0
    out = workdir / "out" / "w4-rtn"
    good = (out / "report.json").read_bytes()
    fail_step(3)
    failed = invoke("run", recipe, "--set", "steps.0.rtn.bits=3")
    assert failed.exit_code == 1
    assert (out / "report.json").read_bytes() == good
    last = json.loads((out / ".last-failed-report.json").read_text())
    assert last["status"] == "failed" and "injected failure" in last["error"]
    shown = invoke("report", out)
    assert shown.exit_code == 0 and "a newer attempt failed" in shown.output, shown.output


def test_a_nan_model_fails_and_its_report_is_valid_json(local_model, recipe_writer, workdir):
    from safetensors.torch import load_file, save_file

    weights = local_model / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[key] = tensors[key].fill_(float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    recipe = recipe_writer(local_model, budgets="  max_perplexity: 1000000")
    result = invoke("run", recipe)
    assert result.exit_code == 1, result.output
    assert "non-finite metric" in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    report = json.loads((workdir / "out" / "w4-rtn" / "report.json").read_text())  # strict JSON: no NaN
    assert report["status"] == "failed" and report["baseline"]["perplexity"] is None
    assert "perplexity" in report["baseline"]["invalid"]
    assert not (workdir / "out" / "w4-rtn" / "model.safetensors").exists()


def test_sigterm_during_distillation_exits_143_and_resumes(local_model, recipe_writer, workdir, monkeypatch):
    import os
    import signal

    from llmslim.distill.trainer import Distiller

    steps = ("  - distill: {dataset: text:./data/train.txt, tokens: 256, seqlen: 16, batch_size: 2, "
             "eval_windows: 2, checkpoint_every: 2}")
    recipe = recipe_writer(local_model, steps=steps)
    original_run = Distiller.run

    def terminated_run(self):
        self.callback = lambda step, d: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None
        return original_run(self)

    monkeypatch.setattr(Distiller, "run", terminated_run)
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 143, result.output
    assert "terminated" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(Distiller, "run", original_run)
    again = invoke("run", recipe)
    assert again.exit_code == 0, again.output
    assert _report(workdir)["steps"][0]["changed"]["resumed_from_step"] == 3


def test_the_text_behind_a_recover_block_is_in_the_fingerprint(local_model, recipe_writer, workdir):
    from llmslim.fingerprints import DigestCache, run_keys
    from llmslim.recipe import load_recipe

    (workdir / "data" / "recover.txt").write_text("Some text to recover with.\n\n" * 20)
    steps = ("  - sparsify: {method: magnitude, sparsity: 0.5, rounds: 2, "
             "recover: {dataset: text:./data/recover.txt, tokens: 64, seqlen: 16, batch_size: 2}}")
    recipe = load_recipe(recipe_writer(local_model, steps=steps))

    def key():
        return run_keys(recipe, recipe.to_plain(), local_model, "cpu", DigestCache()).steps

    before = key()
    (workdir / "data" / "recover.txt").write_text("Other text.\n\n" * 20)
    assert key() != before
    clash = recipe_writer(local_model, steps=steps, output="./data/recover.txt")
    assert "the dataset of step 1" in " ".join(invoke("validate", clash).output.split())
