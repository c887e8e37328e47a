"""The gptq step on tiny models of several architectures: quantize, export in
the GPTQ format, reload through llmslim's loader, same logits."""

from __future__ import annotations

import json

import pytest
import torch

from llmslim.modeling import load_model, load_tokenizer, save_checkpoint
from llmslim.progress import Progress
from llmslim.quant.qlinear import QuantLinear
from llmslim.recipe.steps import GptqConfig, RtnConfig
from llmslim.steps import StepContext, run_step


def _context(path, samples=8, seqlen=32):
    from llmslim.data import sample_windows
    from llmslim.evaluate.perplexity import tokenize_text
    from tests.conftest import CORPUS

    tokenizer = load_tokenizer(str(path))
    windows = sample_windows(tokenize_text(tokenizer, CORPUS), samples, seqlen, seed=0)
    return tokenizer, StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0,
                                  progress=Progress(quiet=True), calibration=windows)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_gptq_export_reload_same_logits(tmp_path, model_factory, arch):
    path = model_factory(arch)
    model = load_model(str(path), "float32", "cpu")
    tokenizer, ctx = _context(path)
    outcome = run_step(model, GptqConfig(bits=4, group_size=32), ctx)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == outcome.changed["modules_quantized"] > 0
    assert all(0 < s["relative_output_error"] < 0.5 and s["damp"] >= 0.01 for s in outcome.layers)
    ids = ctx.calibration[:2]
    with torch.no_grad():
        expected = model(ids).logits
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    reloaded = load_model(str(tmp_path / "ckpt"), "float32", "cpu")
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == len(quantized)
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_quantization_config_fields(tmp_path, model_factory):
    path = model_factory("llama")
    model = load_model(str(path), "float32", "cpu")
    tokenizer, ctx = _context(path)
    run_step(model, GptqConfig(bits=4, group_size=32, act_order=True, damp=0.02), ctx)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    for key, value in {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
                       "true_sequential": True, "damp_percent": 0.02, "format": "gptq",
                       "checkpoint_format": "gptq"}.items():
        assert config[key] == value, key
    assert json.loads((tmp_path / "ckpt" / "quantize_config.json").read_text()) == config
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as fh:
        prefix = "model.layers.0.self_attn.q_proj"
        assert fh.get_tensor(f"{prefix}.qweight").dtype == torch.int32
        assert fh.get_tensor(f"{prefix}.qweight").shape == (64 * 4 // 32, 64)
        assert fh.get_tensor(f"{prefix}.qzeros").dtype == torch.int32
        assert fh.get_tensor(f"{prefix}.scales").dtype == torch.float16
        assert torch.equal(fh.get_tensor(f"{prefix}.g_idx"), torch.arange(64, dtype=torch.int32) // 32)
        assert f"{prefix}.weight" not in fh.keys() and "lm_head.weight" in fh.keys()


def test_gptq_error_below_rtn_per_layer(model_factory):
    path = model_factory("llama")
    _, ctx = _context(path, samples=16)
    gptq_model = load_model(str(path), "float32", "cpu")
    rtn_model = load_model(str(path), "float32", "cpu")
    gptq = run_step(gptq_model, GptqConfig(bits=3, group_size=-1, act_order=False, scale_search="minmax",
                                           format="dense"), ctx)
    run_step(rtn_model, RtnConfig(bits=3, group_size=-1, format="dense"), ctx)
    # compare outputs of the whole model on the calibration windows
    ref_model = load_model(str(path), "float32", "cpu")
    ids = ctx.calibration
    with torch.no_grad():
        ref = ref_model(ids).logits
        err_gptq = (gptq_model(ids).logits - ref).norm() / ref.norm()
        err_rtn = (rtn_model(ids).logits - ref).norm() / ref.norm()
    assert err_gptq < err_rtn
    assert gptq.changed["format"] == "dense"


def test_rtn_reports_its_true_weight_error(model_factory):
    """The per-layer error compares with the weights before rounding (in fp32 the step once compared
    the rounded weights with themselves, reporting 0)."""
    from llmslim.modeling import find_linears

    path = model_factory("llama")
    model = load_model(str(path), "float32", "cpu")
    original = {n: m.weight.detach().clone() for n, m in find_linears(model, ["lm_head"]).items()}
    _, ctx = _context(path)
    outcome = run_step(model, RtnConfig(bits=3, group_size=32, format="dense"), ctx)
    for row in outcome.layers:
        w, q = original[row["module"]], model.get_submodule(row["module"]).weight
        assert row["relative_weight_error"] == pytest.approx(((q - w).norm() / w.norm()).item(), rel=1e-5)
        assert row["relative_weight_error"] > 0.01


def test_gptq_step_through_the_cli(workdir, model_factory, recipe_writer):
    from typer.testing import CliRunner

    from llmslim.cli import app

    recipe = recipe_writer(model_factory("llama"), steps="  - gptq: {bits: 4, group_size: 32}")
    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "out" / "w4-rtn" / "report.json").read_text())
    assert report["result"]["linear_kernel"] and report["baseline"]["linear_kernel"] is None
    assert report["result"]["size_bytes"] < report["baseline"]["size_bytes"]
    assert report["result"]["parameters"] == report["baseline"]["parameters"]
    layers = report["steps"][0]["layers"]
    assert {"relative_output_error", "damp", "seconds"} <= set(layers[0])
    rerun = CliRunner().invoke(app, ["run", str(recipe)])
    assert rerun.exit_code == 0 and "up to date" in rerun.output


@pytest.mark.parametrize(("arch", "expected"), [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
])
def test_true_sequential_groups_follow_the_data_flow(model_factory, arch, expected):
    from llmslim.calibration import capture_layer_inputs, linear_groups
    from llmslim.modeling import decoder_layers, find_linears

    path = model_factory(arch)
    model = load_model(str(path), "float32", "cpu")
    _, ctx = _context(path, samples=2)
    layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, ctx.calibration, torch.device("cpu"), batch_size=2).layer(0)
    assert linear_groups(layers[0], find_linears(layers[0]), inputs) == expected


def test_linears_fed_by_one_tensor_share_one_hessian():
    """q/k/v see the same tensor: one Hessian is accumulated, used by all three,
    and dropped after the last of them is compressed."""
    from llmslim.quant import accumulate_hessian, make_empty_hessian
    from llmslim.steps.gptq import GPTQCompressor

    compressor = GPTQCompressor(GptqConfig(bits=4, group_size=-1), torch.device("cpu"))
    linears = {n: torch.nn.Linear(16, 8) for n in ("q", "k", "v", "o")}
    expected = make_empty_hessian(16, torch.device("cpu")), 0
    for seed in range(3):
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))
        for name in ("q", "k", "v"):
            compressor.collect(name, linears[name], x)
        compressor.collect("o", linears["o"], torch.randn(2, 5, 16))
        expected = accumulate_hessian(*expected, x)
    assert list(compressor.hessians) == ["q", "o"]
    torch.testing.assert_close(compressor.hessians["q"][0], expected[0])
    for name in ("q", "k"):
        compressor.compress(0, name, linears[name])
        assert "q" in compressor.hessians
    compressor.compress(0, "v", linears["v"])
    assert list(compressor.hessians) == ["o"]
