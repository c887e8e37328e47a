"""The `memory:` block, the memory plan (resident or streamed per phase, where activations live), the
dry run that reads no weights, and the report's plan-vs-measured record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmslim.cli import app
from llmslim.errors import RecipeError
from llmslim.memory_estimates import TOKENIZE_PEAK_BYTES_PER_CHAR, Estimate, calibration_activations, phase_names
from llmslim.memory_plan import MemoryPlan, choose, plan_memory, read_model_facts
from llmslim.recipe import load_recipe

runner = CliRunner()
GB = 10**9


def _with_memory(recipe_path, lines: str):
    """The recipe with a `memory:` block appended; returns (path, line of the block's first entry)."""
    text = recipe_path.read_text().rstrip("\n") + "\n"
    first = text.count("\n") + 2
    recipe_path.write_text(text + "memory:\n" + lines)
    return recipe_path, first


@pytest.mark.parametrize("lines, expected", [
    ("  max_device_memory: 20XB\n", "memory.max_device_memory: unknown unit 'XB'"),
    ("  max_host_memory: lots\n", "memory.max_host_memory: not a size"),
    ("  mod: streamed\n", "memory.mod: unknown key 'mod' (did you mean 'mode'?)"),
    ("  mode: fast\n", "memory.mode: Input should be 'auto', 'resident' or 'streamed'"),
    ("  max_shard_size: 0\n", "memory.max_shard_size: a size must be positive"),
])
def test_memory_block_errors_are_located(recipe_writer, model_factory, lines, expected):
    path, line = _with_memory(recipe_writer(model_factory("llama")), lines)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:{line}: {expected}" in str(err.value)


@pytest.mark.parametrize("folder, expected", [
    ("./out/w4-rtn", "is the output"),
    ("./out/w4-rtn/offload", "lies inside the output"),
    (".", "is the recipe's folder"),
    ("./data", "contains the calibration dataset"),
    ("MODEL/offload", "lies inside the input model"),
])
def test_offload_folder_keeps_clear_of_inputs_and_output(recipe_writer, model_factory, folder, expected):
    model = model_factory("llama")
    path, line = _with_memory(recipe_writer(model), f"  offload_folder: {folder.replace('MODEL', str(model))}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:{line}: memory.offload_folder:" in str(err.value) and expected in str(err.value)


def test_memory_block_is_resolved_and_only_written_when_given(recipe_writer, model_factory):
    plain = load_recipe(recipe_writer(model_factory("llama")))
    assert "memory" not in plain.to_plain() and plain.memory.mode == "auto"
    path, _ = _with_memory(recipe_writer(model_factory("llama")),
                           "  max_device_memory: 20GB\n  max_host_memory: 64GiB\n  offload_folder: ./offload\n"
                           "  mode: streamed\n  max_shard_size: 512MB\n")
    recipe = load_recipe(path)
    mem = recipe.memory
    assert (mem.max_device_memory, mem.max_host_memory, mem.max_shard_size) == (20 * GB, 64 * 2**30, 512 * 10**6)
    assert mem.offload_folder == str(path.parent.resolve() / "offload") and mem.mode == "streamed"
    assert recipe.to_plain()["memory"]["max_shard_size"] == 512 * 10**6
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2", "phi3"])
def test_model_facts_match_the_loaded_model(arch, model_factory):
    from transformers import AutoModelForCausalLM

    from llmslim.modeling import decoder_layers, find_linears

    facts, note = read_model_facts(str(model_factory(arch)), "float32", False)
    model = AutoModelForCausalLM.from_pretrained(model_factory(arch))
    unique = {id(p): p for p in model.parameters()}.values()
    layers = decoder_layers(model)
    assert note == "" and facts.parameters == sum(p.numel() for p in unique)
    assert facts.weight_bytes == sum(p.numel() * p.element_size() for p in unique)
    assert facts.layers == len(layers)
    assert facts.layer_parameters == max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    linears = [m for layer in layers for m in find_linears(layer).values()]
    assert facts.linear_parameters == sum(m.weight.numel() for m in linears)
    assert facts.vocab == model.get_input_embeddings().weight.shape[0]


def test_calibration_activations_formula(model_factory):
    facts, _ = read_model_facts(str(model_factory("llama")), "float32", False)
    # inputs and outputs of every window (2 x samples x seqlen x hidden x 4 bytes) + rotary cos/sin
    assert calibration_activations(facts, 16, 128) == 2 * 16 * 128 * 64 * 4 + 2 * 16 * 128 * 16 * 4


def _est(device: int, host: int, acts: int = 0, weights: int = 0) -> Estimate:
    return Estimate(weights=weights, device_without_acts=device, host_without_acts=host, activations=acts,
                    seconds=1.0)


def test_choose_resident_when_it_fits_else_streamed_with_activations_where_they_fit():
    estimates = [
        ("load", _est(10 * GB, 2 * GB), _est(1 * GB, 2 * GB)),
        ("baseline", _est(12 * GB, 2 * GB), _est(3 * GB, 2 * GB)),
        ("step 1 gptq", _est(14 * GB, 2 * GB, acts=8 * GB), _est(2 * GB, 3 * GB, acts=8 * GB)),
    ]
    roomy = choose(estimates, device_limit=40 * GB, host_limit=100 * GB, device="cuda")
    assert [p.mode for p in roomy.phases] == ["resident"] * 3 and not roomy.streamed
    assert roomy.phase("step 1 gptq").activations == "device"
    assert roomy.phase("step 1 gptq").device_bytes == 22 * GB and roomy.phase("step 1 gptq").host_bytes == 2 * GB

    tight = choose(estimates, device_limit=14 * GB, host_limit=100 * GB, device="cuda")
    assert [p.mode for p in tight.phases] == ["streamed", "resident", "streamed"] and tight.streamed
    assert tight.mode("load") == "streamed"  # a later phase streams: the model is not loaded whole
    gptq = tight.phase("step 1 gptq")
    assert gptq.activations == "device" and gptq.device_bytes == 10 * GB and gptq.fits

    small = choose(estimates, device_limit=8 * GB, host_limit=100 * GB, device="cuda")
    gptq = small.phase("step 1 gptq")  # 2 GB layer + 8 GB activations > 90% of 8 GB: activations on the host
    assert (gptq.mode, gptq.activations, gptq.device_bytes, gptq.host_bytes) == ("streamed", "host", 2 * GB, 11 * GB)
    assert gptq.fits

    forced = choose(estimates, forced="resident", device_limit=8 * GB, host_limit=100 * GB, device="cuda")
    assert {p.mode for p in forced.phases} == {"resident"} and not forced.phase("baseline").fits
    assert "OVER THE LIMIT" in forced.phase("baseline").reason


def test_choose_on_cpu_uses_one_memory():
    estimates = [("load", _est(5 * GB, 5 * GB), _est(1 * GB, 1 * GB))]
    plan = choose(estimates, device_limit=50 * GB, host_limit=4 * GB, device="cpu")
    assert plan.device_limit == plan.host_limit == 4 * GB and plan.mode("load") == "streamed"
    assert plan.phases[0].device_bytes == plan.phases[0].host_bytes == 1 * GB


def test_plan_memory_follows_the_limits_and_the_forced_mode(recipe_writer, model_factory):
    recipe = load_recipe(recipe_writer(model_factory("llama"), steps="  - gptq: {bits: 4, group_size: 32}"))
    plan = plan_memory(recipe, free_device_bytes=100 * GB, free_host_bytes=100 * GB, base_host_bytes=0)
    assert [p.phase for p in plan.phases] == phase_names(recipe) == ["load", "baseline", "step 1 gptq", "evaluate"]
    assert not plan.streamed and plan.limits_from == "free memory now"
    facts, _ = read_model_facts(recipe.model, "float32", False)
    text = sum(Path(f"data/{name}.txt").stat().st_size for name in ("train", "test"))  # the workdir's files
    tokenizing = TOKENIZE_PEAK_BYTES_PER_CHAR * text  # the load phase also tokenizes the text
    assert plan.mode("load") == "resident" and plan.phase("load").device_bytes == facts.weight_bytes + tokenizing
    assert all(p.device_bytes > facts.weight_bytes for p in plan.phases[1:])

    on_gpu = recipe.model_copy(update={"device": "cuda"})  # planned, not run: no GPU needed
    resident = plan_memory(on_gpu, free_device_bytes=100 * GB, free_host_bytes=100 * GB, base_host_bytes=0)
    forced = on_gpu.model_copy(update={"memory": recipe.memory.model_copy(update={"mode": "streamed"})})
    streamed = plan_memory(forced, free_device_bytes=100 * GB, free_host_bytes=100 * GB, base_host_bytes=0)
    assert {p.mode for p in resident.phases} == {"resident"} and {p.mode for p in streamed.phases} == {"streamed"}
    assert all(s.device_bytes < r.device_bytes for s, r in zip(streamed.phases, resident.phases))
    assert resident.phase("load").device_bytes == facts.weight_bytes
    assert resident.phase("load").host_bytes == max(facts.weight_bytes, tokenizing)  # weights pass through
    assert streamed.phase("load").device_bytes == 0  # streamed: weights are read when a phase needs them

    limited = recipe.model_copy(update={"memory": recipe.memory.model_copy(update={"max_host_memory": 10**6})})
    tiny = plan_memory(limited, free_device_bytes=100 * GB, base_host_bytes=0)
    assert tiny.limits_from == "recipe memory block" and tiny.host_limit == tiny.device_limit == 10**6
    assert tiny.mode("load") == "streamed"


@pytest.fixture
def no_downloads(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args} {kwargs}")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
        monkeypatch.setattr(f"huggingface_hub.file_download.{name}" if name == "hf_hub_download"
                            else "huggingface_hub._snapshot_download.snapshot_download", refuse)


def test_dry_run_shows_the_memory_plan_and_downloads_nothing(recipe_writer, model_factory, no_downloads):
    recipe = recipe_writer(model_factory("llama"), steps="  - gptq: {bits: 4, group_size: 32}")
    result = runner.invoke(app, ["run", str(recipe), "--dry-run", "--set", "memory.mode=streamed"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "memory plan on cpu" in text and "step 1 gptq │ streamed" in text and "memory.mode" in text
    assert text.count("│ streamed │") == 4
    assert not (recipe.parent / "out").exists()


def test_plan_says_when_the_weights_are_not_yet_local(tmp_path, model_factory, recipe_writer, monkeypatch,
                                                       no_downloads):
    import shutil

    from huggingface_hub import constants

    from llmslim.plan import plan_recipe

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--acme--config-only" / "snapshots" / ("0" * 40)
    (snapshot.parent.parent / "refs").mkdir(parents=True)
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(model_factory("llama") / "config.json", snapshot / "config.json")
    recipe = load_recipe(recipe_writer(model_factory("llama")))
    plan = plan_recipe(recipe.model_copy(update={"model": "acme/config-only"}))
    assert not plan.weights_local and plan.note.startswith("weights not yet local")
    assert plan.memory is not None and plan.memory.phases and plan.parameters > 0
    absent = plan_recipe(recipe.model_copy(update={"model": "acme/absent"}))
    assert absent.memory is None and absent.note.startswith("weights not local; config not available")


def test_nested_peaks_keep_the_outer_blocks_peak():
    from llmslim.evaluate.memory import PeakMemory

    cpu = torch.device("cpu")
    with PeakMemory(cpu) as outer:
        start = outer.host_peak_bytes
        big = torch.ones(50_000_000)  # 200 MB, touched, then freed before the inner block resets the mark
        del big
        with PeakMemory(cpu) as inner:
            pass
    assert outer.host_peak_bytes >= start + 190_000_000
    assert inner.host_peak_bytes < start + 100_000_000 and outer.peak_bytes == outer.host_peak_bytes


def test_run_reports_each_phase_estimate_beside_its_measured_peak(recipe_writer, model_factory):
    from llmslim.report import read_report

    recipe = recipe_writer(model_factory("llama"), steps="  - gptq: {bits: 4, group_size: 32}")
    result = runner.invoke(app, ["run", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "estimated vs measured" in " ".join(result.output.split())
    report = read_report(recipe.parent / "out" / "w4-rtn")
    memory = report.memory
    assert [p.phase for p in memory.phases] == ["load", "baseline", "step 1 gptq", "evaluate"]
    assert memory.device == "cpu" and "VmHWM" in memory.host_measure
    for phase in memory.phases:
        assert phase.mode == "resident" and phase.measured_seconds is not None
        ratio = phase.estimated_device_bytes / phase.measured_device_bytes
        assert 0.75 <= ratio <= 1.25, (phase.phase, ratio)
        assert phase.measured_host_bytes == phase.measured_device_bytes  # cpu: one memory
    assert report.steps[0].peak_memory_bytes == memory.phases[2].measured_device_bytes
    data = json.loads((recipe.parent / "out" / "w4-rtn" / "report.json").read_text())
    assert data["memory"]["phases"][0]["estimated_device_bytes"] == memory.phases[0].estimated_device_bytes


def test_memory_plan_of_a_plan_renders():
    from llmslim.render import memory_plan_table

    plan = MemoryPlan(phases=choose([("load", _est(1, 1), _est(1, 1))], device_limit=GB, device="cuda").phases,
                      device="cuda", device_limit=GB, host_limit=GB, limits_from="recipe memory block")
    table = memory_plan_table(plan)
    assert table.row_count == 1 and "recipe memory block" in str(table.title)


def test_a_packed_result_is_planned_with_its_kernel_copy(recipe_writer, model_factory):
    """Packed linears prepare their kernel's own copy of the codes when they first run: the evaluation of
    a format: gptq result holds about the packed weights twice (a 3B run measured it over its limit)."""
    model = model_factory("llama")
    facts, _ = read_model_facts(str(model), "float32", False)

    def evaluate(fmt):
        recipe = load_recipe(recipe_writer(model, steps=f"  - gptq: {{bits: 4, group_size: 32, format: {fmt}}}"))
        return plan_memory(recipe, free_device_bytes=100 * GB, free_host_bytes=100 * GB, base_host_bytes=0,
                           facts=facts).phase("evaluate").device_bytes

    packed_codes = facts.linear_parameters * 4 // 8
    dense, packed = evaluate("dense"), evaluate("gptq")
    weights = facts.weight_bytes - facts.linear_parameters * 4 + packed_codes
    assert packed - (dense - facts.weight_bytes + weights) == packed_codes + 8 * facts.largest_linear
