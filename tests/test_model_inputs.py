"""Models that are incomplete, corrupt, unavailable or too short for the recipe
are refused at validation (exit 2, located, naming the file or keys), before
any weight loads; the load itself double-checks; --dry-run opens no weights."""

from __future__ import annotations

import builtins
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmslim.cli import app
from llmslim.errors import ModelLoadError
from tests.conftest import ARCHS

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def rewrite_tensors(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    save_file(edit(dict(state)), folder / "model.safetensors", metadata={"format": "pt"})


def refused(recipe: Path, *needles: str, folder: Path | None = None) -> None:
    """validate and run both exit 2, name every needle, print no traceback and leave ``folder`` intact."""
    before = digests(folder) if folder else None
    for command in ("validate", "run"):
        result = invoke(command, recipe)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())  # rich wraps long lines
        for needle in needles:
            assert needle in text, (needle, result.output)
        assert "Traceback" not in result.output and "internal error" not in result.output
    if folder:
        assert digests(folder) == before
    assert not (recipe.parent / "out").exists()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_complete_checkpoints_of_every_family_pass(arch, model_factory):
    from llmslim.weight_files import weights_problem

    assert weights_problem(model_factory(arch)) is None


def test_complete_checkpoint_validates(model_factory, recipe_writer):
    result = invoke("validate", recipe_writer(model_factory("gpt2")))
    assert result.exit_code == 0, result.output


def test_missing_layer_is_refused_naming_the_keys(model_factory, recipe_writer, tmp_path):
    model = copy_model(model_factory("llama"), tmp_path / "partial")
    rewrite_tensors(model, lambda s: {k: v for k, v in s.items() if ".layers.1." not in k})
    refused(recipe_writer(model), "model:", "missing: model.layers.1.input_layernorm.weight",
            "(9 in all)", "randomly initialised", folder=model)


def test_unexpected_and_reshaped_tensors_are_refused(model_factory, recipe_writer, tmp_path):
    import torch

    model = copy_model(model_factory("opt"), tmp_path / "odd")

    def edit(state):
        state["model.decoder.extra.weight"] = torch.zeros(3)
        state["model.decoder.final_layer_norm.weight"] = torch.ones(32)
        return state

    rewrite_tensors(model, edit)
    refused(recipe_writer(model), "unexpected: model.decoder.extra.weight",
            "model.decoder.final_layer_norm.weight: checkpoint [32], config.json [64]", folder=model)


def test_truncated_safetensors_is_refused(model_factory, recipe_writer, tmp_path):
    model = copy_model(model_factory("llama"), tmp_path / "cut")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(recipe_writer(model), f"{weights} is truncated or corrupt", "re-download or re-save it", folder=model)


def test_corrupt_header_is_refused(model_factory, recipe_writer, tmp_path):
    model = copy_model(model_factory("llama"), tmp_path / "garbled")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    refused(recipe_writer(model), "is truncated or corrupt (its header is not valid JSON)", folder=model)


def test_load_model_refuses_a_truncated_file_and_keys_the_header_check_missed(model_factory, tmp_path,
                                                                              monkeypatch):
    from llmslim import modeling

    cut = copy_model(model_factory("llama"), tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        modeling.load_model(str(cut))
    # the load's own check, should the header check ever miss something
    partial = copy_model(model_factory("gpt2"), tmp_path / "partial")
    rewrite_tensors(partial, lambda s: {k: v for k, v in s.items() if not k.startswith("transformer.h.1.")})
    monkeypatch.setattr(modeling, "weights_problem", lambda *a, **k: None)
    with pytest.raises(ModelLoadError, match=r"missing: transformer\.h\.1\.attn\.c_attn\.bias"):
        modeling.load_model(str(partial))


def test_sharded_checkpoint_checked_shard_by_shard(model_factory, recipe_writer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model_factory("llama")).save_pretrained(model, max_shard_size="100KB")
    shutil.copy(model_factory("llama") / "tokenizer.json", model)
    shutil.copy(model_factory("llama") / "tokenizer_config.json", model)
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    recipe = recipe_writer(model)
    assert invoke("validate", recipe).exit_code == 0
    shards[-1].unlink()
    refused(recipe, "model.safetensors.index.json lists 1 missing shard(s)", shards[-1].name, folder=model)


def test_pickle_only_folder_needs_allow_pickle(model_factory, recipe_writer, tmp_path):
    model = copy_model(model_factory("llama"), tmp_path / "pickled")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    refused(recipe_writer(model), "has only pickle weights (pytorch_model.bin)", "allow_pickle: true", folder=model)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache; any attempt to download fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError(f"snapshot_download called: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    return cache


def cache_model(cache: Path, repo: str, src: Path) -> Path:
    """``src`` as the cached snapshot of hub id ``repo``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    return copy_model(src, root / "snapshots" / ("0" * 40))


def test_hub_id_not_in_the_cache_is_refused_without_the_network(hub_cache, recipe_writer):
    recipe = recipe_writer("acme/absent-model")
    refused(recipe, "model: 'acme/absent-model' is not a local folder and not in the local Hugging Face cache",
            "hf download acme/absent-model")
    dry = invoke("run", recipe, "--dry-run")
    assert dry.exit_code == 2 and "not in the local Hugging Face cache" in dry.output


def test_cached_hub_id_validates_and_plans(hub_cache, model_factory, recipe_writer):
    cache_model(hub_cache, "acme/tiny", model_factory("llama"))
    recipe = recipe_writer("acme/tiny")
    assert invoke("validate", recipe).exit_code == 0
    dry = invoke("run", recipe, "--dry-run")
    assert dry.exit_code == 0, dry.output


def test_cached_hub_id_without_weights_is_refused(hub_cache, model_factory, recipe_writer):
    snapshot = cache_model(hub_cache, "acme/config-only", model_factory("llama"))
    (snapshot / "model.safetensors").unlink()
    refused(recipe_writer("acme/config-only"), "in the local Hugging Face cache without its weights")


def test_plan_of_an_uncached_hub_id_says_so(hub_cache, model_factory, recipe_writer):
    from llmslim.plan import plan_recipe
    from llmslim.recipe import load_recipe

    recipe = load_recipe(recipe_writer(model_factory("llama"))).model_copy(update={"model": "acme/absent"})
    plan = plan_recipe(recipe)
    assert plan.parameters is None and plan.note.startswith("weights not local; config not available")


def test_dry_run_opens_no_weight_file(model_factory, recipe_writer, monkeypatch):
    import safetensors
    import safetensors.torch

    from llmslim.plan import plan_recipe
    from llmslim.recipe import load_recipe

    recipe = load_recipe(recipe_writer(model_factory("qwen2")))
    opened = []
    real_open = builtins.open

    def spy_open(file, *args, **kwargs):
        if str(file).endswith(".safetensors"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def refuse(*args, **kwargs):
        opened.append(str(args[0]))
        raise AssertionError("weights read")

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    plan = plan_recipe(recipe)
    assert plan.parameters and plan.parameters > 0 and opened == []


def test_model_path_that_is_not_a_folder_is_not_a_hub_id(hub_cache, tmp_path):
    from llmslim.modeling import resolve_model_path

    with pytest.raises(ModelLoadError, match="model folder not found: .*nowhere"):
        resolve_model_path(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="model folder not found"):
        resolve_model_path("./models/absent")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file, not a model folder"):
        resolve_model_path(str(tmp_path / "file.txt"))


@pytest.mark.parametrize("field, value, where, what", [
    ("calibration.seqlen", 300, "calibration.seqlen", "seqlen (300 tokens)"),
    ("evaluate.perplexity.seqlen", 257, "evaluate.perplexity.seqlen", "seqlen (257 tokens)"),
    ("evaluate.latency.new_tokens", 250, "evaluate.latency", "prompt_tokens + new_tokens = 8 + 250 (258 tokens)"),
])
def test_sequences_longer_than_the_context_are_refused(field, value, where, what, model_factory, recipe_writer):
    recipe = recipe_writer(model_factory("llama"))
    result = invoke("validate", recipe, "--set", f"{field}={value}")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"{where}: {what} is more than the model's context of 256 tokens (max_position_embeddings" in text


def test_gpt2_context_is_n_positions(model_factory, recipe_writer):
    recipe = recipe_writer(model_factory("gpt2"))
    result = invoke("validate", recipe, "--set", "calibration.seqlen=512")
    assert result.exit_code == 2 and "context of 256 tokens (n_positions in its config.json)" in result.output
    assert invoke("validate", recipe, "--set", "calibration.seqlen=256").exit_code == 0


def test_distill_seqlen_is_checked_against_model_and_teacher(model_factory, recipe_writer, tmp_path):
    teacher = copy_model(model_factory("llama"), tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config["max_position_embeddings"] = 128
    (teacher / "config.json").write_text(json.dumps(config))
    steps = f"  - distill: {{dataset: text:./data/train.txt, teacher: {teacher}, seqlen: 200, tokens: 1000}}"
    result = invoke("validate", recipe_writer(model_factory("llama"), steps=steps))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "steps[0].distill.seqlen: seqlen (200 tokens) is more than the teacher's context of 128" in text
    assert "the model's context" not in text


def test_distill_teacher_with_missing_weights_is_refused(model_factory, recipe_writer, tmp_path):
    teacher = copy_model(model_factory("llama"), tmp_path / "teacher")
    rewrite_tensors(teacher, lambda s: {k: v for k, v in s.items() if k != "lm_head.weight"})
    steps = f"  - distill: {{dataset: text:./data/train.txt, teacher: {teacher}, seqlen: 32, tokens: 1000}}"
    refused(recipe_writer(model_factory("llama"), steps=steps), "steps[0].distill.teacher:", "missing: lm_head.weight",
            folder=teacher)


@pytest.mark.parametrize("step, message", [
    ("prune: {}", "removes nothing (every target is 0); set heads, mlp or layers"),
    ("prune: {heads: 0, mlp: 0.0, layers: 0}", "removes nothing (every target is 0)"),
    ("prune: {mlp: {keep: 128}}", "removes nothing on this model (the targets equal the model's sizes)"),
    ("prune: {mlp: 0.01}", "removes nothing on this model (mlp: removing 1% of 128 channels rounds to none"),
])
def test_prune_that_removes_nothing_is_refused(step, message, model_factory, recipe_writer):
    result = invoke("validate", recipe_writer(model_factory("llama"), steps=f"  - {step}"))
    assert result.exit_code == 2, result.output
    assert f"steps[0].prune: {message}" in " ".join(result.output.split())


def test_prune_of_a_hub_model_with_zero_targets_is_refused(hub_cache, model_factory, recipe_writer):
    cache_model(hub_cache, "acme/tiny", model_factory("llama"))
    result = invoke("validate", recipe_writer("acme/tiny", steps="  - prune: {layers: 0}"))
    assert result.exit_code == 2 and "removes nothing (every target is 0)" in result.output


def test_gptq_checkpoint_checked_for_its_packed_tensors(model_factory, recipe_writer, workdir, tmp_path):
    assert invoke("run", recipe_writer(model_factory("llama"))).exit_code == 0
    packed = copy_model(workdir / "out" / "w4-rtn", tmp_path / "packed")
    recipe = recipe_writer(packed, name="again", steps="  - rtn: {bits: 8, group_size: 32, format: dense}",
                           output="./out/again")
    assert invoke("validate", recipe).exit_code == 0
    rewrite_tensors(packed, lambda s: {k: v for k, v in s.items() if k != "model.layers.1.mlp.up_proj.qzeros"})
    before = digests(packed)
    result = invoke("validate", recipe)
    assert result.exit_code == 2 and "missing: model.layers.1.mlp.up_proj.qzeros" in " ".join(result.output.split())
    assert digests(packed) == before
