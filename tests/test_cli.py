"""The CLI end to end on tiny models: outputs, exit codes, budgets, failures,
atomic output, resume and the no-op rerun."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llmslim.cli import app
from llmslim.workspace import OutputLock

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_run_writes_checkpoint_and_report(model_factory, recipe_writer, workdir):
    recipe = recipe_writer(model_factory("llama"))
    result = invoke("run", recipe, "--json")
    assert result.exit_code == 0, result.output
    out = workdir / "out" / "w4-rtn"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "report.json", "recipe.yaml", "run.log"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert json.loads(result.stdout) == report
    assert report["status"] == "passed" and report["schema_version"] == 1
    for key in ("perplexity", "parameters", "size_bytes", "bits_per_parameter", "peak_memory_bytes",
                "prefill_tokens_per_s", "decode_tokens_per_s", "energy_j_per_token"):
        assert key in report["baseline"] and key in report["result"]
    assert report["baseline"]["perplexity"] > 1 and report["result"]["perplexity"] > 1
    assert report["result"]["size_bytes"] == (out / "model.safetensors").stat().st_size
    assert report["result"]["energy_j_per_token"] is not None or report["result"]["energy_unavailable_reason"]
    (step,) = report["steps"]
    assert step["name"] == "rtn" and step["changed"]["modules_quantized"] == 2 * 7
    assert report["calibration"]["samples"] == 4 and len(report["calibration"]["token_ids_sha256"]) == 64
    assert report["budgets"] == [{"name": "max_size_mb", "limit": 1000.0, "actual": pytest.approx(
        report["result"]["size_bytes"] / 1e6), "passed": True, "note": None}]
    assert not list(workdir.glob("out/.w4-rtn.*work*")), "work folder removed after success"


def test_rerun_of_a_finished_recipe_is_a_no_op(model_factory, recipe_writer, workdir):
    recipe = recipe_writer(model_factory("llama"))
    assert invoke("run", recipe).exit_code == 0
    weights = workdir / "out" / "w4-rtn" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = invoke("run", recipe)
    assert again.exit_code == 0 and "up to date" in again.output
    assert weights.stat().st_mtime_ns == before
    changed = invoke("run", recipe, "--set", "steps.0.rtn.bits=3")
    assert changed.exit_code == 0 and "up to date" not in changed.output
    assert weights.stat().st_mtime_ns != before


def test_missed_budget_exits_3_and_still_writes(model_factory, recipe_writer, workdir):
    recipe = recipe_writer(model_factory("llama"), budgets="  max_size_mb: 0.001\n  max_perplexity_increase: 1000%")
    result = invoke("run", recipe)
    assert result.exit_code == 3, result.output
    out = workdir / "out" / "w4-rtn"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "budget_failed" and (out / "model.safetensors").is_file()
    missed = [b["name"] for b in report["budgets"] if not b["passed"]]
    assert missed == ["max_size_mb"]


def test_failed_step_exits_1_with_report(model_factory, recipe_writer, workdir, monkeypatch):
    import llmslim.pipeline as pipeline

    def broken(model, config, ctx):
        raise RuntimeError("the step broke")

    monkeypatch.setattr(pipeline, "run_step", broken)
    recipe = recipe_writer(model_factory("llama"))
    result = invoke("run", recipe)
    assert result.exit_code == 1, result.output
    report = json.loads((workdir / "out" / "w4-rtn" / "report.json").read_text())
    assert report["status"] == "failed" and "the step broke" in report["error"]
    assert not (workdir / "out" / "w4-rtn" / "config.json").exists()
    assert "Traceback" not in result.output


def test_invalid_recipe_exits_2_without_traceback(workdir, model_factory, recipe_writer):
    recipe = recipe_writer(model_factory("llama"), steps="  - rtn: {bits: 4, grop_size: 32}")
    result = invoke("run", recipe)
    assert result.exit_code == 2
    assert f"{recipe}:12: steps[0].rtn.grop_size: unknown key 'grop_size' (did you mean 'group_size'?)" in result.output
    assert "Traceback" not in result.output
    assert invoke("validate", recipe).exit_code == 2
    assert not (workdir / "out").exists()


def test_validate_ok_and_dry_run(workdir, model_factory, recipe_writer):
    recipe = recipe_writer(model_factory("llama"))
    assert invoke("validate", recipe).exit_code == 0
    result = invoke("run", recipe, "--dry-run")
    assert result.exit_code == 0 and "plan: w4-rtn" in result.output and "rtn(bits=4" in result.output
    assert not (workdir / "out").exists()


def test_existing_output_is_not_overwritten(workdir, model_factory, recipe_writer):
    out = workdir / "out" / "w4-rtn"
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep")
    recipe = recipe_writer(model_factory("llama"))
    result = invoke("run", recipe)
    assert result.exit_code == 2 and "not written by llmslim" in result.output
    assert (out / "precious.txt").is_file()
    forced = invoke("run", recipe, "--force")
    assert forced.exit_code == 2 and "never deletes it, even with --force" in forced.output
    assert (out / "precious.txt").read_text() == "keep"
    (out / "precious.txt").unlink()
    assert invoke("run", recipe).exit_code == 0, "an empty folder may be filled"
    other = recipe_writer(model_factory("llama"), name="other", output="./out/w4-rtn")
    result = invoke("run", other)
    assert result.exit_code == 2 and "holds the output of recipe 'w4-rtn'" in result.output


def test_concurrent_run_on_same_output_refuses(workdir, model_factory, recipe_writer):
    recipe = recipe_writer(model_factory("llama"))
    (workdir / "out").mkdir()
    with OutputLock(workdir / "out" / "w4-rtn"):
        result = invoke("run", recipe)
    assert result.exit_code == 2 and "is being written by pid" in result.output


def test_crash_mid_run_leaves_no_output_and_resumes(workdir, model_factory, recipe_writer, monkeypatch):
    import llmslim.pipeline as pipeline

    steps = "  - rtn: {bits: 8, group_size: 32, format: dense}\n  - rtn: {bits: 4, group_size: 32}"
    recipe = recipe_writer(model_factory("llama"), steps=steps)
    real, calls = pipeline.run_step, []

    def crash_on_second(model, config, ctx):
        calls.append(config.bits)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, config, ctx)

    monkeypatch.setattr(pipeline, "run_step", crash_on_second)
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 130 and "rerun to resume" in result.output
    assert not (workdir / "out" / "w4-rtn").exists(), "no half-written output"
    monkeypatch.setattr(pipeline, "run_step", real)
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "out" / "w4-rtn" / "report.json").read_text())
    assert [s["resumed"] for s in report["steps"]] == [True, False]
    assert "resuming after step 1" in (workdir / "out" / "w4-rtn" / "run.log").read_text()


def test_crash_while_publishing_keeps_previous_output(workdir, model_factory, recipe_writer, monkeypatch):
    import llmslim.outcome as outcome

    recipe = recipe_writer(model_factory("llama"))
    assert invoke("run", recipe).exit_code == 0
    out = workdir / "out" / "w4-rtn"
    before = (out / "report.json").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outcome, "publish", crash)
    assert runner.invoke(app, ["run", str(recipe), "--set", "steps.0.rtn.bits=3"]).exit_code == 130
    assert (out / "report.json").read_text() == before and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in (workdir / "out").iterdir()) == [".w4-rtn.work", "w4-rtn"]
    monkeypatch.undo()
    again = runner.invoke(app, ["run", str(recipe), "--set", "steps.0.rtn.bits=3"])
    assert again.exit_code == 0 and "resuming after step 1" in again.output, again.output


def test_report_and_compare_commands(workdir, model_factory, recipe_writer):
    recipe = recipe_writer(model_factory("llama"))
    assert invoke("run", recipe).exit_code == 0
    out = workdir / "out" / "w4-rtn"
    shown = invoke("report", out)
    assert shown.exit_code == 0 and "perplexity" in shown.output and "budgets" in shown.output
    compared = invoke("report", out / "report.json", "--compare", out)
    assert compared.exit_code == 0 and "comparison" in compared.output
    missing = invoke("report", workdir / "nothing")
    assert missing.exit_code == 2 and "no report.json" in missing.output


def test_eval_command(workdir, model_factory):
    result = invoke("eval", model_factory("gpt2"), "--dataset", "text:data/test.txt", "--seqlen", "32", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["perplexity"] > 1 and metrics["decode_tokens_per_s"] > 0
    bad = invoke("eval", model_factory("gpt2"), "--dataset", "text:nope.txt")
    assert bad.exit_code == 2 and "file not found" in bad.output


def test_pickle_weights_are_refused(workdir, model_factory, recipe_writer):
    import shutil

    src = model_factory("llama")
    pickled = workdir / "pickled"
    shutil.copytree(src, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    result = invoke("run", recipe_writer(pickled))
    assert result.exit_code == 2 and "pickle" in result.output


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "opt"])
def test_architectures_end_to_end_and_reload(workdir, model_factory, recipe_writer, arch):
    from transformers import AutoModelForCausalLM

    recipe = recipe_writer(model_factory(arch), steps="  - rtn: {bits: 4, group_size: 32, sym: false, format: dense}")
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    out = workdir / "out" / "w4-rtn"
    report = json.loads((out / "report.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    from llmslim.evaluate import prepare_eval_windows
    from llmslim.evaluate.perplexity import perplexity
    from llmslim.recipe import load_recipe
    from transformers import AutoTokenizer

    cfg = load_recipe(recipe).evaluate
    windows, _ = prepare_eval_windows(cfg, AutoTokenizer.from_pretrained(out))
    assert perplexity(reloaded, windows) == pytest.approx(report["result"]["perplexity"], rel=1e-5)
    assert report["steps"][0]["changed"]["modules_quantized"] > 0
