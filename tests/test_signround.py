"""The signround step (learned rounding): its grid is the quantizer's, it
starts at round-to-nearest (or exactly at GPTQ's result) and lowers every
layer's output error from there, against the full-precision layer or the
full-precision model, leaves no gradient state in the model, packs into GPTQ
checkpoints that reload to the same numbers, and validates its options."""

from __future__ import annotations

import json

import pytest
import torch

from llmslim.errors import RecipeError
from llmslim.modeling import find_linears, linear_weight, load_model, load_tokenizer, save_checkpoint
from llmslim.progress import Progress
from llmslim.quant import QuantSpec, rtn_quantize_weight
from llmslim.quant.gptq import gptq_quantize_weight
from llmslim.quant.qlinear import QuantLinear
from llmslim.quant.quantizer import grid_from_range
from llmslim.quant.signround import LearnedRounding, group_ranges, learned_grid
from llmslim.recipe import load_recipe
from llmslim.recipe.steps import GptqConfig, RtnConfig, SignroundConfig
from llmslim.steps import StepContext, run_step


@pytest.fixture(autouse=True)
def one_thread():
    """Many small ops per step: on a shared 2-core machine one thread is much faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _context(path, samples=8, seqlen=32):
    from llmslim.data import sample_windows
    from llmslim.evaluate.perplexity import tokenize_text
    from tests.conftest import CORPUS

    tokenizer = load_tokenizer(str(path))
    windows = sample_windows(tokenize_text(tokenizer, CORPUS), samples, seqlen, seed=0)
    return tokenizer, StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0,
                                  progress=Progress(quiet=True), calibration=windows)


def _weight(n=24, k=80, seed=0) -> torch.Tensor:
    """Random rows plus the grid's corner cases: an all-zero row, all-positive and all-negative rows."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[1] = 0
    w[2] = w[2].abs() + 0.1
    w[3] = -w[3].abs()
    return w


# -- the grid ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, -1])   # 80 columns: 64 leaves a partial last group
def test_start_is_round_to_nearest_bit_for_bit(bits, sym, group_size):
    w = _weight()
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    expected = rtn_quantize_weight(w, spec)
    got = LearnedRounding(w, spec).quantized()
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert torch.equal(LearnedRounding(w, spec).fake_weight().detach(), expected.dequantize())


@pytest.mark.parametrize("sym", [True, False])
def test_clipped_grid_is_the_quantizers_grid_of_the_clipped_range(sym):
    w = _weight()
    xmin, xmax = group_ranges(w, QuantSpec(bits=3, group_size=32, sym=sym))
    gen = torch.Generator().manual_seed(1)
    alpha, beta = 0.5 + 0.5 * torch.rand(xmax.shape, generator=gen), 0.5 + 0.5 * torch.rand(xmax.shape, generator=gen)
    scale, zero = learned_grid(xmin, xmax, alpha, None if sym else beta, 7, sym)
    ref_scale, ref_zero = grid_from_range((alpha if sym else beta) * xmin, alpha * xmax, 7, sym)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)


@pytest.mark.parametrize("sym", [True, False])
def test_gradients_reach_offsets_and_clipping_and_zeros_stay_zero(sym):
    w = _weight()
    w[5, ::3] = 0                                                    # sparse weights
    rounding = LearnedRounding(w, QuantSpec(bits=2, group_size=32, sym=sym))
    target = torch.randn_like(w)
    ((rounding.fake_weight() - target) ** 2).sum().backward()
    params = rounding.parameters()
    assert len(params) == (2 if sym else 3)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():   # any offsets in [-0.5, 0.5]: an exact zero stays exactly zero
        rounding.offsets.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
        rounding.offsets[5, ::3] = 0.5
        rounding.offsets[5, 3::3] = -0.5
    assert (rounding.fake_weight().detach()[w == 0] == 0).all()
    assert (rounding.quantized().dequantize()[w == 0] == 0).all()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64])
def test_start_from_gptq_reproduces_its_codes_and_moves_at_most_half_a_step(sym, group_size):
    w = _weight()
    x = torch.randn(256, w.shape[1], generator=torch.Generator().manual_seed(3))
    h = x.t() @ x / 256
    spec = QuantSpec(bits=3, group_size=group_size, sym=sym, scale_search="mse")
    qw, stats = gptq_quantize_weight(w, h, spec, act_order=True, static_groups=True, keep_rounded=True)
    # the weights GPTQ rounded are the ones its codes are the round-to-nearest of
    s, z = qw.scales[qw.g_idx.long()].t(), qw.zeros[qw.g_idx.long()].t().float()
    assert torch.equal(torch.clamp(torch.round(stats.rounded / s) + z, 0, spec.maxq).to(torch.uint8), qw.codes)
    for rounded in (stats.rounded, None):   # anchored at the rounded weights, or at the codes themselves
        rounding = LearnedRounding(w, spec, start=qw, rounded=rounded)
        got = rounding.quantized()
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(got, field), getattr(qw, field)), field
        torch.testing.assert_close(rounding.fake_weight().detach(), qw.dequantize(), rtol=0, atol=1e-6)
        assert rounding.parameters() == [rounding.offsets]   # GPTQ's grid is kept
        anchor = rounding.offsets.detach().clone()
        for _ in range(40):   # the offsets never leave the start's +-0.5
            rounding.sign_step([torch.randn_like(w)], 0.1)
        assert (rounding.offsets - anchor).abs().max() <= 0.5 + 1e-6
        rounding.reset()
        assert torch.equal(rounding.quantized().codes, qw.codes)
    dynamic, _ = gptq_quantize_weight(w, h, spec, act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="natural groups"):
        LearnedRounding(w, spec, start=dynamic)


# -- the step ---------------------------------------------------------------------------------------------------------

def _logit_error(model, ref_logits, ids) -> float:
    with torch.no_grad():
        return float((model(ids).logits - ref_logits).norm() / ref_logits.norm())


@pytest.mark.parametrize(("arch", "sym"), [("llama", True), ("gpt2", False), ("qwen2", False)])
def test_learned_rounding_lowers_every_layers_error(model_factory, arch, sym):
    path = model_factory(arch)
    _, ctx = _context(path)
    original = load_model(str(path), "float32", "cpu")
    with torch.no_grad():
        ref = original(ctx.calibration).logits
    model = load_model(str(path), "float32", "cpu")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    outcome = run_step(model, SignroundConfig(bits=2, group_size=32, sym=sym, iters=40, batch_size=4), ctx)
    rows = outcome.layers
    assert [r["layer"] for r in rows] == list(range(len(rows))) and len(rows) >= 2
    for row in rows:   # the start is round-to-nearest; learned rounding must cut each layer's error clearly
        assert 0 < row["relative_error"] < 0.9 * row["start_relative_error"], row
        assert row["error_ratio"] < 0.8 and row["best_iter"] >= 0 and row["iters"] == 40
    ch = outcome.changed
    assert ch["relative_error"] < ch["start_relative_error"] and ch["layers_kept_start"] == 0
    assert ch["modules_quantized"] == len(find_linears(model.get_submodule(_layers_path(arch)), ["lm_head"]))
    assert ch["lr"] == pytest.approx(1 / 40) and ch["format"] == "dense"
    # no gradient state left in the model
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # the whole model is closer to the original than round-to-nearest of the same grid
    rtn = load_model(str(path), "float32", "cpu")
    run_step(rtn, RtnConfig(bits=2, group_size=32, sym=sym, format="dense"), ctx)
    assert _logit_error(model, ref, ctx.calibration) < 0.8 * _logit_error(rtn, ref, ctx.calibration)


def _layers_path(arch: str) -> str:
    return {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}[arch]


def test_one_iteration_keeps_round_to_nearest(model_factory):
    """The first iteration only measures the start: nothing better is seen, so RTN is kept exactly."""
    path = model_factory("llama")
    _, ctx = _context(path, samples=4)
    model, rtn = load_model(str(path), "float32", "cpu"), load_model(str(path), "float32", "cpu")
    outcome = run_step(model, SignroundConfig(bits=3, group_size=32, iters=1, lr=0.5), ctx)
    run_step(rtn, RtnConfig(bits=3, group_size=32, format="dense"), ctx)
    assert all(r["best_iter"] == -1 and r["error_ratio"] == 1.0 for r in outcome.layers)
    assert outcome.changed["layers_kept_start"] == len(outcome.layers)
    for (name, a), b in zip(find_linears(model, ["lm_head"]).items(), find_linears(rtn, ["lm_head"]).values()):
        assert torch.equal(linear_weight(a), linear_weight(b)), name


def test_gptq_start_is_exactly_the_gptq_step_and_learning_only_improves_it(model_factory):
    path = model_factory("llama")
    _, ctx = _context(path, samples=4)
    gptq = load_model(str(path), "float32", "cpu")
    run_step(gptq, GptqConfig(bits=3, group_size=32, format="dense"), ctx)
    kept = load_model(str(path), "float32", "cpu")
    outcome = run_step(kept, SignroundConfig(bits=3, group_size=32, iters=1, start="gptq"), ctx)
    assert outcome.changed["layers_kept_start"] == len(outcome.layers) and outcome.changed["start"] == "gptq"
    for (name, a), b in zip(find_linears(kept, ["lm_head"]).items(), find_linears(gptq, ["lm_head"]).values()):
        torch.testing.assert_close(linear_weight(a), linear_weight(b), rtol=0, atol=1e-6, msg=name)
    learned = load_model(str(path), "float32", "cpu")
    rows = run_step(learned, SignroundConfig(bits=2, group_size=32, iters=30, batch_size=2, start="gptq"), ctx).layers
    assert all(r["relative_error"] <= r["start_relative_error"] for r in rows)
    assert any(r["relative_error"] < r["start_relative_error"] for r in rows)


def test_model_target_is_the_full_precision_models_own_hidden_states(model_factory):
    """With the start kept (one iteration), each layer's start error against ``target: model`` is the
    distance between the quantized and the full-precision model's hidden states after that layer."""
    path = model_factory("llama")
    _, ctx = _context(path, samples=4)
    original = load_model(str(path), "float32", "cpu")
    model = load_model(str(path), "float32", "cpu")
    rows = run_step(model, SignroundConfig(bits=3, group_size=32, iters=1, target="model", batch_size=4), ctx).layers
    with torch.no_grad():
        ref = original(ctx.calibration, output_hidden_states=True).hidden_states
        got = model(ctx.calibration, output_hidden_states=True).hidden_states
    for row in rows[:-1]:   # the last entry of hidden_states has the final norm applied
        i = row["layer"] + 1
        expected = float((got[i] - ref[i]).norm() / ref[i].norm())
        assert row["start_relative_error"] == pytest.approx(expected, rel=1e-4), row
    assert rows[-1]["start_relative_error"] > rows[0]["start_relative_error"]   # the error builds up


def test_packed_checkpoint_round_trip(tmp_path, model_factory):
    path = model_factory("llama")
    tokenizer, ctx = _context(path)
    config = dict(bits=2, group_size=32, sym=False, iters=20, batch_size=4)
    dense = load_model(str(path), "float32", "cpu")
    run_step(dense, SignroundConfig(**config, format="dense"), ctx)
    packed = load_model(str(path), "float32", "cpu")
    outcome = run_step(packed, SignroundConfig(**config, format="gptq"), ctx)
    quantized = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == outcome.changed["modules_quantized"] == 14
    assert packed.config.quantization_config["meta"]["method"] == "signround"
    save_checkpoint(packed, tokenizer, tmp_path / "ckpt")
    reloaded = load_model(str(tmp_path / "ckpt"), "float32", "cpu")
    ids = ctx.calibration[:4]
    with torch.no_grad():
        got, in_memory, expected = reloaded(ids).logits, packed(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, in_memory, rtol=1e-5, atol=1e-5)
    # the dense run learned the same rounding; the checkpoint differs only by its float16 scales
    for name, module in reloaded.named_modules():
        if isinstance(module, QuantLinear):
            torch.testing.assert_close(module.dequantize_weight().float(), linear_weight(dense.get_submodule(name)),
                                       rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


# -- options and recipes ----------------------------------------------------------------------------------------------

def test_options_are_validated():
    default = SignroundConfig()
    assert (default.format, default.iters, default.batch_size, default.step_size) == ("dense", 200, 8, 1 / 200)
    assert (default.start, default.target) == ("nearest", "layer")
    assert default.ignore == ["lm_head"] and SignroundConfig(lr=0.01).step_size == 0.01
    assert SignroundConfig(bits=5).bits == 5      # dense takes any width from 2 to 8
    for bad, message in [({"bits": 5, "format": "gptq"}, "format gptq packs 2, 3, 4 or 8 bits"),
                         ({"group_size": 4}, "at least 8"), ({"iters": 0}, "greater than or equal to 1"),
                         ({"lr": 0}, "greater than 0"), ({"batch_size": 0}, "greater than or equal to 1"),
                         ({"bits": 1}, "greater than or equal to 2"), ({"iter": 10}, "Extra inputs"),
                         ({"start": "awq"}, "'nearest' or 'gptq'"), ({"target": "logits"}, "'layer' or 'model'")]:
        with pytest.raises(ValueError, match=message):
            SignroundConfig(**bad)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    (step,) = load_recipe(recipes / "signround-w2.yaml").steps
    assert isinstance(step, SignroundConfig) and step.bits == 2 and step.group_size == 128
    (step,) = load_recipe(recipes / "signround-gptq-w3.yaml").steps
    assert (step.bits, step.sym, step.start, step.target, step.format) == (3, False, "gptq", "model", "gptq")


def test_step_through_the_cli(workdir, model_factory, recipe_writer):
    from typer.testing import CliRunner

    from llmslim.cli import app

    bad = recipe_writer(model_factory("llama"), name="bad", steps="  - signround: {bits: 6, format: gptq}")
    with pytest.raises(RecipeError, match=r"bad\.yaml:\d+: steps\[0\]\.signround"):
        load_recipe(bad)
    recipe = recipe_writer(model_factory("llama"), steps="  - signround: {bits: 4, group_size: 32, iters: 5, "
                                                         "batch_size: 2, format: gptq}")
    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "out" / "w4-rtn" / "report.json").read_text())
    assert report["result"]["size_bytes"] < report["baseline"]["size_bytes"]
    layers = report["steps"][0]["layers"]
    assert len(layers) == 2 and all(r["relative_error"] <= r["start_relative_error"] for r in layers)
    assert report["steps"][0]["changed"]["format"] == "gptq"
