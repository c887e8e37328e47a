"""Issue 15: group sizes that do not divide a layer's width (a partial last group, the standard GPTQ
layout) for gptq and rtn, packed, reloaded through llmslim's loader and run by its kernels."""

from __future__ import annotations

import json

import pytest
import torch

from llmslim.modeling import load_model, load_tokenizer, save_checkpoint
from llmslim.progress import Progress
from llmslim.quant import QuantLinear, QuantSpec, gptq_quantize_weight, rtn_quantize_weight
from llmslim.quant.qlinear import int4_geometry
from llmslim.recipe.steps import GptqConfig, RtnConfig
from llmslim.steps import StepContext, run_step
from tests.conftest import CORPUS, make_tokenizer

# widths of real models that no common group size divides: 192 (small Qwen2), 576 (SmolLM2), 688 (MLP)
TINY = {
    "llama-192-688": ("LlamaConfig", "LlamaForCausalLM",
                      dict(hidden_size=192, intermediate_size=688, num_attention_heads=6, num_key_value_heads=2)),
    "qwen2-576-688": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(hidden_size=576, intermediate_size=688, num_attention_heads=9, num_key_value_heads=3)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    cache = {}

    def get(name):
        if name not in cache:
            config_cls, model_cls, sizes = TINY[name]
            tokenizer = make_tokenizer()
            config = getattr(transformers, config_cls)(
                vocab_size=len(tokenizer), num_hidden_layers=1, max_position_embeddings=128,
                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **sizes)
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(name)
            getattr(transformers, model_cls)(config).eval().save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            cache[name] = folder
        return cache[name]

    return get


def _context(path):
    from llmslim.data import sample_windows
    from llmslim.evaluate.perplexity import tokenize_text

    tokenizer = load_tokenizer(str(path))
    windows = sample_windows(tokenize_text(tokenizer, CORPUS), 8, 32, seed=0)
    return tokenizer, StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0,
                                  progress=Progress(quiet=True), calibration=windows)


CASES = [  # model, step config: every width x group size, sym/asym, act-order on/off (dynamic and static)
    ("llama-192-688", GptqConfig(bits=4, group_size=128, act_order=True)),
    ("llama-192-688", GptqConfig(bits=4, group_size=64, sym=False, act_order=False)),
    ("llama-192-688", GptqConfig(bits=3, group_size=32, act_order=True, static_groups=False,
                                 scale_search="minmax")),
    ("llama-192-688", RtnConfig(bits=4, group_size=128, sym=False)),
    ("qwen2-576-688", GptqConfig(bits=4, group_size=128, sym=False, act_order=True, static_groups=False,
                                 scale_search="minmax")),
    ("qwen2-576-688", GptqConfig(bits=8, group_size=64, scale_search="minmax")),
    ("qwen2-576-688", RtnConfig(bits=3, group_size=32, scale_search="mse")),
    ("qwen2-576-688", RtnConfig(bits=4, group_size=128)),
]


def _case_id(value) -> str:
    if isinstance(value, str):
        return value
    opts = value.model_dump(include={"bits", "group_size", "sym", "act_order", "static_groups"})
    return value.STEP_NAME + "-" + "-".join(f"{k}{v}" for k, v in opts.items())


@pytest.mark.parametrize("name,config", CASES, ids=_case_id)
def test_quantize_export_reload_same_logits(tmp_path, tiny, name, config):
    path = tiny(name)
    model = load_model(str(path), "float32", "cpu")
    tokenizer, ctx = _context(path)
    outcome = run_step(model, config, ctx)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == outcome.changed["modules_quantized"] == 7
    gs = config.group_size
    down = layers["model.layers.0.mlp.down_proj"]                       # 688 inputs: always a partial group
    assert down.scales.shape[0] == -(-688 // gs) and down.qzeros.shape[0] == -(-688 // gs)
    assert down.qweight.shape[0] == -(-688 * config.bits // 32)
    if not getattr(config, "act_order", False) or getattr(config, "use_static_groups", True):
        assert down.g_idx.tolist() == [k // gs for k in range(688)]
    assert {row["kernel"] for row in outcome.layers} <= {"dequant", "int8pack"}   # fp32: exact paths
    ids = ctx.calibration[:2]
    with torch.no_grad():
        expected = model(ids).logits
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    quant = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert quant["group_size"] == gs and quant["bits"] == config.bits
    reloaded = load_model(str(tmp_path / "ckpt"), "float32", "cpu")
    with torch.no_grad():
        got = reloaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bf16_runs_the_int4_kernel_padded_where_groups_are_partial(tmp_path, tiny):
    path = tiny("llama-192-688")
    model = load_model(str(path), "bfloat16", "cpu")
    tokenizer, ctx = _context(path)
    outcome = run_step(model, GptqConfig(bits=4, group_size=128, scale_search="minmax"), ctx)
    kernels = {row["module"].rsplit(".", 1)[-1]: row["kernel"] for row in outcome.layers}
    # 192 = 128 + 64 and 688 = 5 x 128 + 48: every layer has a partial group, padded to whole groups
    assert set(kernels.values()) == {"int4pack+pad"}
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(5, 688, dtype=torch.bfloat16)
    ref = x.float() @ down.dequantize_weight().t()
    y = down(x)
    assert down.kernel == "int4pack+pad" and ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    reloaded = load_model(str(tmp_path / "ckpt"), "bfloat16", "cpu")
    ids = ctx.calibration[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("k,n,gs,expected", [
    (688, 256, 128, (128, 768, 256)),    # partial last group: K padded to 6 whole groups
    (576, 576, 128, (128, 640, 576)),
    (576, 576, 64, (64, 576, 576)),      # divides: no padding
    (688, 200, 688, (64, 704, 208)),     # one group (per channel): least padding, N to a multiple of 16
    (256, 64, 48, None),                 # no kernel group size divides 48: dequant
])
def test_int4_geometry(k, n, gs, expected):
    assert int4_geometry(k, n, gs, -(-k // gs)) == expected


def _correlated_inputs(k: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(tokens, k, generator=g) @ mix * torch.linspace(0.2, 2.0, k)


@pytest.mark.parametrize("sym,act_order,static", [(True, False, False), (False, False, False),
                                                  (True, True, True), (False, True, False)])
def test_gptq_error_on_the_partial_group_no_worse_than_rtn(sym, act_order, static):
    """K = 176 with group size 128: the last group has 48 columns. The inputs of the two groups are
    independent (block-diagonal Hessian), so GPTQ's updates stay inside each group and the partial
    group's output error is its own."""
    full, tail, n = 128, 48, 64
    x = torch.cat([_correlated_inputs(full, 2048, 0), _correlated_inputs(tail, 2048, 1)], dim=1)
    h = 2 * x.t() @ x / x.shape[0]
    h[:full, full:] = 0
    h[full:, :full] = 0
    w = torch.randn(n, full + tail, generator=torch.Generator().manual_seed(2)) * 0.05
    spec = QuantSpec(4, 128, sym=sym)
    gq, _ = gptq_quantize_weight(w, h, spec, act_order=act_order, static_groups=static)
    rq = rtn_quantize_weight(w, spec)
    assert gq.scales.shape == (2, n)
    if not act_order or static:
        assert gq.g_idx.tolist() == [0] * full + [1] * tail

    def tail_error(qw):
        d = (w - qw.dequantize())[:, full:]
        return torch.einsum("ok,kl,ol->", d, h[full:, full:], d).item()

    assert tail_error(gq) <= tail_error(rq)
    # the partial group's grid is its own: RTN's codes there are those of a 48-column matrix alone
    alone = rtn_quantize_weight(w[:, full:], QuantSpec(4, -1, sym=sym))
    assert torch.equal(rq.codes[:, full:], alone.codes) and torch.allclose(rq.scales[1], alone.scales[0])
