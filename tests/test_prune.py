"""The prune step: structured pruning of heads, MLP channels and layers on tiny
models of each family; the result reloads with plain transformers and gives
the same logits; targets are validated with located messages."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmslim.errors import RecipeError, StepError
from llmslim.modeling import count_parameters, decoder_layers, load_model, load_tokenizer, save_checkpoint
from llmslim.progress import Progress
from llmslim.prune import importance as imp
from llmslim.prune.families import model_shape
from llmslim.prune.shapes import HeadPlan, TargetError, head_options, plan_pruning
from llmslim.recipe import load_recipe
from llmslim.recipe.steps import PruneConfig
from llmslim.steps import StepContext, run_step

WIDTH = {"heads": 0.5, "mlp": 0.25}
CASES = [
    ("llama", dict(WIDTH, importance="activation")),
    ("llama", {"layers": 1}),
    ("qwen2", dict(WIDTH, importance="taylor")),
    ("qwen2", {"layers": 0.5, "mlp": {"keep": 64}}),
    ("mistral", dict(WIDTH, importance="magnitude")),
    ("mistral", {"layers": 1, "importance": "taylor", "heads": {"keep": 2}}),
    ("gpt2", {"mlp": 0.25, "importance": "activation"}),
    ("gpt2", {"layers": 1, "mlp": 0.5, "importance": "taylor"}),
    ("opt", {"mlp": 0.25, "importance": "magnitude"}),
    ("opt", {"layers": 1}),
]


def _context(path, samples=8, seqlen=32):
    from llmslim.data import sample_windows
    from llmslim.evaluate.perplexity import tokenize_text
    from tests.conftest import CORPUS

    tokenizer = load_tokenizer(str(path))
    windows = sample_windows(tokenize_text(tokenizer, CORPUS), samples, seqlen, seed=0)
    return tokenizer, StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0,
                                  progress=Progress(quiet=True), calibration=windows)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _check_consistent(model):
    """GQA invariant, layer indices and config agree with the modules."""
    cfg = model.config
    layers = decoder_layers(model)
    assert len(layers) == cfg.num_hidden_layers
    for position, layer in enumerate(layers):
        assert all(m.layer_idx == position for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))
    if getattr(cfg, "num_key_value_heads", None):
        assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
        attn, head_dim = layers[0].self_attn, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        assert attn.q_proj.out_features == cfg.num_attention_heads * head_dim == attn.o_proj.in_features
        assert attn.k_proj.out_features == cfg.num_key_value_heads * head_dim
        assert attn.num_key_value_groups == cfg.num_attention_heads // cfg.num_key_value_heads
    for key in ("layer_types",):
        if getattr(cfg, key, None) is not None:
            assert len(getattr(cfg, key)) == cfg.num_hidden_layers


@pytest.mark.parametrize("arch,options", CASES, ids=[f"{a}-{'-'.join(o)}" for a, o in CASES])
def test_pruned_checkpoint_reloads_with_same_logits(tmp_path, model_factory, arch, options):
    path = model_factory(arch)
    tokenizer, ctx = _context(path)
    model = load_model(str(path), "float32", "cpu")
    before = count_parameters(model)
    outcome = run_step(model, PruneConfig(**options), ctx)
    changed = outcome.changed
    assert changed["parameters_before"] == before > changed["parameters_after"] == count_parameters(model)
    assert len(outcome.layers) == 2 and all("removed" in row for row in outcome.layers)
    if "layers" in options:
        assert changed["decoder_layers"] == [2, 1] and sum(r["removed"] for r in outcome.layers) == 1
        assert all("block_influence" in r for r in outcome.layers)
    _check_consistent(model)
    ids = ctx.calibration[:2]
    expected = _logits(model, ids)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    _check_consistent(reloaded)
    assert count_parameters(reloaded) == changed["parameters_after"]
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-4, atol=1e-4)
    prompt = ids[:1, :6]
    with torch.no_grad():  # the KV cache path (layer indices) agrees too
        a = model.generate(prompt, max_new_tokens=4, do_sample=False)
        b = reloaded.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


def test_width_pruning_writes_the_new_sizes(model_factory):
    path = model_factory("llama")
    _, ctx = _context(path)
    model = load_model(str(path), "float32", "cpu")
    outcome = run_step(model, PruneConfig(heads=0.5, mlp=0.25), ctx)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 16, 96)
    assert outcome.changed["attention_heads"] == [4, 2] and outcome.changed["key_value_heads"] == [2, 1]
    assert outcome.changed["intermediate_size"] == [128, 96]
    row = outcome.layers[0]
    assert len(row["heads_removed"]) == 2 == len(row["heads_removed_importance"])
    assert row["mlp_channels_removed"] == 32 and row["mlp_removed_importance_mean"] <= row["mlp_kept_importance_mean"]


@pytest.mark.parametrize("options", [{}, {"heads": 0.0, "mlp": 0.0, "layers": 0}, {"mlp": 0.01, "layers": 0.1}])
def test_pruning_nothing_is_the_identity(model_factory, options):
    path = model_factory("qwen2")
    _, ctx = _context(path)
    model = load_model(str(path), "float32", "cpu")
    ids = ctx.calibration[:2]
    expected = _logits(model, ids)
    outcome = run_step(model, PruneConfig(**options), ctx)
    assert torch.equal(_logits(model, ids), expected)
    assert outcome.changed["parameters_removed"] == 0 and not hasattr(model.config, "head_dim")
    if options.get("mlp"):  # a fraction that rounds to no removal says so
        assert any("rounds to none" in n for n in outcome.changed["notes"])
        assert any("rounds to 0" in n for n in outcome.changed["notes"])


def _gqa_model(heads=8, kv=2):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
                           num_key_value_heads=kv, vocab_size=50, max_position_embeddings=64)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def test_gqa_equal_heads_per_group_reload(tmp_path):
    model = _gqa_model()  # 8 query heads in 2 groups of 4; 6 = 2 groups x 3 heads
    outcome = run_step(model, PruneConfig(heads={"keep": 6}, importance="magnitude", round_to=1), StepContext(
        tokenizer=None, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True)))
    assert outcome.changed["key_value_heads"] == [2, 2] and outcome.changed["attention_heads"] == [8, 6]
    assert "every key/value group" in outcome.changed["gqa"]
    for row in outcome.layers:  # one head removed from each group
        assert sorted(h // 4 for h in row["heads_removed"]) == [0, 1]
    _check_consistent(model)
    assert model.config.head_dim == 8 != model.config.hidden_size // model.config.num_attention_heads
    ids = torch.randint(0, 50, (2, 12))
    save_checkpoint(model, None, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def test_head_shapes_keep_gqa_valid():
    shape = model_shape({"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32,
                         "num_key_value_heads": 8, "intermediate_size": 11008, "num_hidden_layers": 32})
    for keep in head_options(32, 8):
        plan = plan_pruning(shape, PruneConfig(heads={"keep": keep}) if keep < 32 else PruneConfig())
        if plan.heads:
            assert plan.heads.total == keep and plan.heads.groups <= 8 and plan.heads.per_group <= 4
    plan = plan_pruning(shape, PruneConfig(heads=0.25, mlp=0.25, layers=0.1))
    assert plan.heads == HeadPlan(groups=6, per_group=4)  # whole groups preferred
    assert plan.mlp_keep == 8256 and plan.mlp_keep % 8 == 0 and plan.drop_layers == 3
    mqa = model_shape({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 8,
                       "num_key_value_heads": 1, "intermediate_size": 128, "num_hidden_layers": 2})
    assert plan_pruning(mqa, PruneConfig(heads=0.5)).heads == HeadPlan(groups=1, per_group=4)
    with pytest.raises(TargetError, match="grouped-query attention.*valid counts: 1, 2, 3, .*, 28, 32"):
        plan_pruning(shape, PruneConfig(heads={"keep": 11}))  # 11 is prime and above 8 groups and 4 per group
    # transformers' LlamaConfig also wants hidden_size % heads == 0: 24 of 32 heads is not a Llama
    llama = model_shape({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                         "num_key_value_heads": 8, "intermediate_size": 11008, "num_hidden_layers": 32})
    assert list(head_options(32, 8, 4096)) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(TargetError, match="divide hidden_size 4096"):
        plan_pruning(llama, PruneConfig(heads={"keep": 24}))
    notes_plan = plan_pruning(llama, PruneConfig(heads=0.25))
    assert notes_plan.heads.total == 16 and "50.0% applied" in notes_plan.notes[0]


def test_importance_functions_on_hand_made_tensors():
    x = torch.tensor([[[3.0, 4.0, 1.0, 0.0]], [[0.0, 0.0, 0.0, 2.0]]])  # 2 tokens, 2 heads of dim 2
    assert imp.head_sq_sums(x, 2).tolist() == [25.0, 5.0]
    assert imp.channel_abs_sums(torch.tensor([[1.0, -2.0], [-3.0, 0.5]])).tolist() == [4.0, 2.5]
    grams = imp.head_grams(x, 2)                                  # a_h^T a_h per head
    assert grams[0].tolist() == [[9.0, 12.0], [12.0, 16.0]] and grams[1].tolist() == [[1.0, 0.0], [0.0, 4.0]]
    o = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # hidden 2 x (2 heads x dim 2)
    # head 0 adds o[:, :2] a_0 = (3, 4) and (0, 0): sum of squares 25; head 1 adds (2, 0) and (0, 0): 4
    assert imp.head_output_scores(grams, o, 2).square().tolist() == pytest.approx([12.5, 2.0])
    sq = imp.channel_sq_sums(torch.tensor([[1.0, -2.0], [-3.0, 0.0]]))
    assert sq.tolist() == [10.0, 4.0]
    down = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert imp.channel_output_scores(sq, down, 2).tolist() == pytest.approx([5.0 * 5.0 ** 0.5, 2.0 ** 0.5])
    s, n = imp.cosine_sums(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [-1.0, -1.0]]))
    assert n == 2 and s == pytest.approx(0.0)
    # 4 query heads (dim 1) in 2 groups; k, v one row per group; o one column per head
    q, o = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    k, v = torch.tensor([[2.0], [4.0]]), torch.tensor([[0.0], [2.0]])
    assert imp.per_head_sum(q, k, v, o, 4, 2).tolist() == [3.0, 4.0, 7.0, 8.0]
    assert imp.magnitude_head_scores(q, k, v, o, 4, 2).square().tolist() == pytest.approx([4.0, 7.0, 20.0, 27.0])
    grads = [torch.ones_like(w) for w in (q, k, v, o)]
    assert imp.taylor_head_scores([-q, k, v, o], grads, 4, 2).tolist() == [3.0, 4.0, 7.0, 8.0]
    up, down = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0, 3.0]])
    assert imp.magnitude_channel_scores([up], down).square().tolist() == pytest.approx([3.0, 0.0, 13.0])
    assert imp.taylor_channel_scores([up], [-torch.ones_like(up)], down, torch.ones_like(down)).tolist() == [3, 0, 5]
    scores = torch.tensor([0.1, 5.0, 3.0, 4.0, 9.0, 0.2, 0.3, 0.1])
    assert imp.select_heads(scores, 2, groups=1, per_group=2).tolist() == [4, 6]
    assert imp.select_heads(scores, 2, groups=2, per_group=1).tolist() == [1, 4]
    assert imp.select_heads(scores, 2, groups=1, per_group=4).tolist() == [0, 1, 2, 3]
    assert imp.select_channels(torch.tensor([0.5, 0.1, 0.9, 0.3]), 2).tolist() == [0, 2]
    assert imp.layers_to_drop([0.3, 0.05, 0.2, 0.01], 2) == [1, 3] and imp.layers_to_drop([0.1], 0) == []


@pytest.mark.parametrize("arch,step,field,message", [
    ("llama", "{heads: 1.0}", "heads", "below 1"),
    ("llama", "{heads: 2}", "heads", "write {keep: N}"),
    ("llama", "{heads: {keep: 0}}", "heads", "at least 1"),
    ("llama", "{mlp: {keep: 6.5}}", "mlp", "whole number"),
    ("llama", "{mlp: {keep: 60}}", "", "not a multiple of round_to 8"),
    ("llama", "{layers: 1.5}", "layers", "below 1"),
    ("llama", "{heads: 0.2, importance: fisher}", "importance", "activation"),
    ("llama", "{heads: {keep: 3}}", "heads", "would break grouped-query attention"),
    ("llama", "{mlp: {keep: 256}}", "mlp", "more than the model's intermediate size 128"),
    ("llama", "{layers: 2}", "layers", "at least one must remain"),
    ("gpt2", "{heads: 0.25}", "heads", "head_dim from n_embd / n_head"),
    ("opt", "{heads: {keep: 2}}", "heads", "OPT attention"),
])
def test_invalid_targets_rejected_with_located_messages(model_factory, recipe_writer, arch, step, field, message):
    recipe = recipe_writer(model_factory(arch), steps=f"  - prune: {step}")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    (problem,) = info.value.problems
    assert message in problem.message, problem.message
    assert problem.field == "steps[0].prune" + (f".{field}" if field else "") and problem.line == 12


def test_prune_must_come_before_a_packed_quantization(model_factory, recipe_writer):
    recipe = recipe_writer(model_factory("llama"), steps="  - gptq: {bits: 4}\n  - prune: {mlp: 0.25}")
    with pytest.raises(RecipeError, match="must be the last step"):
        load_recipe(recipe)
    ok = recipe_writer(model_factory("llama"), steps="  - prune: {mlp: 0.25}\n  - gptq: {bits: 4, group_size: 32}")
    assert [s.STEP_NAME for s in load_recipe(ok).steps] == ["prune", "gptq"]


def test_unsupported_heads_fail_at_run_time_too(model_factory):
    path = model_factory("gpt2")
    _, ctx = _context(path)
    model = load_model(str(path), "float32", "cpu")
    with pytest.raises(StepError, match="heads: GPT-2 attention derives head_dim"):
        run_step(model, PruneConfig(heads=0.25), ctx)


def test_prune_through_the_cli(workdir, model_factory, recipe_writer):
    from typer.testing import CliRunner

    from llmslim.cli import app

    recipe = recipe_writer(model_factory("llama"), steps="  - prune: {heads: 0.5, mlp: 0.25, layers: 1}")
    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    out = workdir / "out" / "w4-rtn"
    report = json.loads((out / "report.json").read_text())
    (step,) = report["steps"]
    assert step["name"] == "prune" and step["changed"]["decoder_layers"] == [2, 1]
    assert report["result"]["parameters"] == step["changed"]["parameters_after"] < report["baseline"]["parameters"]
    assert report["result"]["size_bytes"] < report["baseline"]["size_bytes"]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["intermediate_size"], config["num_hidden_layers"]) == (2, 1, 16, 96, 1)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
