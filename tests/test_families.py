"""Model families from the one table (llmslim/families.py): every decoder layer
is calibrated with exactly the inputs the unmodified model gives it (per-layer
masks and rotary embeddings included); Gemma 2/3, Qwen3, Phi-3 and Mistral with
a sliding window quantize (rtn, gptq: export and reload, same logits) and
prune (the pruned checkpoint loads in stock transformers, same logits, per-layer
config fields consistent); what a family cannot do is refused at validation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llmslim.calibration import capture_layer_inputs, sequential_calibrate
from llmslim.cli import app
from llmslim.families import FAMILIES, context_length, family_for, hidden_size, layer_count, model_shape
from llmslim.modeling import decoder_layers, find_linears, linear_features, load_model, load_tokenizer, \
    save_checkpoint
from llmslim.progress import Progress
from llmslim.quant.qlinear import QuantLinear
from llmslim.recipe.steps import GptqConfig, PruneConfig, RtnConfig
from llmslim.steps import StepContext, run_step
from tests.conftest import ARCHS

NEW = ["gemma2", "gemma3", "qwen3", "phi3", "mistral_sliding"]
MIXED = {"gemma2", "gemma3", "qwen3"}  # layers of different attention types in the tiny models


def _context(path, samples=5, seqlen=32):
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


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


IGNORED = {"use_cache", "past_key_values", "past_key_value", "layer_past", "cache"}


def _reference_calls(model, windows, batch_size):
    """What every decoder layer is called with in the unmodified forward: [layer][batch] (hidden, args, kwargs)."""
    layers = decoder_layers(model)
    calls = [[] for _ in layers]

    def grab(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k not in IGNORED and k != "hidden_states"}
            calls[index].append((hidden.clone(), tuple(args[1:]), rest))
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


class _Observe:
    """A compressor that compresses nothing: the loop then just carries the hidden states layer to layer."""

    def select(self, layer_index, linears):
        return {}

    def collect(self, name, module, x):
        raise AssertionError("nothing selected")

    def compress(self, layer_index, name, module):
        raise AssertionError("nothing selected")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_layer_is_calibrated_with_the_inputs_the_model_gives_it(model_factory, arch):
    path = model_factory(arch)
    model = load_model(str(path), "float32", "cpu")
    _, ctx = _context(path)
    windows, batch_size = ctx.calibration, 2  # 5 windows: batches of 2, 2 and 1
    reference = _reference_calls(model, windows, batch_size)
    captured = capture_layer_inputs(model, decoder_layers(model), windows, torch.device("cpu"), batch_size)
    seen: dict[int, list[torch.Tensor]] = {}
    sequential_calibrate(model, windows, _Observe(), device=torch.device("cpu"), ignore=[], batch_size=batch_size,
                         on_layer=lambda i, inputs, _outputs: seen.__setitem__(i, [h.clone() for h in inputs]))
    for index, calls in enumerate(reference):
        inputs = captured.layer(index)
        assert len(inputs.kwargs) == len(calls) == 3
        for batch, (hidden, args, kwargs) in enumerate(calls):
            assert _same(inputs.args[batch], args), (index, batch)
            got = {k: v for k, v in inputs.kwargs[batch].items() if k not in IGNORED}
            assert got.keys() == kwargs.keys() and _same(got, kwargs), (index, batch, sorted(kwargs))
            torch.testing.assert_close(seen[index][batch], hidden, rtol=1e-5, atol=1e-5)
    if arch in MIXED:  # the test can tell layer types apart: what layer 0 gets is not what every layer gets
        assert any(not _same(captured.layer(0).kwargs[0], captured.layer(i).kwargs[0])
                   for i in range(1, len(reference)))


def test_every_family_in_the_table_has_a_tiny_model_and_its_paths_exist(model_factory):
    assert {f.name for f in FAMILIES} <= set(ARCHS)  # adding a family: its table entry and its tiny model
    for family in FAMILIES:
        model = load_model(str(model_factory(family.name)), "float32", "cpu")
        cfg = model.config.to_dict()
        assert family_for(cfg["model_type"]) is family
        assert decoder_layers(model) is model.get_submodule(family.layers)
        layer = model.get_submodule(family.layers)[0]
        attn = layer.get_submodule(family.attention)
        for name in (family.q, family.k, family.v, family.o, *family.head_norms):
            attn.get_submodule(name)
        for name in (*family.mlp_in, family.mlp_out, *family.norms):
            layer.get_submodule(name)
        for key in family.per_layer_keys:
            assert len(cfg[key]) == layer_count(cfg)
        assert context_length(cfg) == (256, family.context_key)
        assert hidden_size(cfg) == 64 and model_shape(cfg).hidden == 64
        widths = [linear_features(m) for m in find_linears(layer).values()]
        inputs, outputs = model_shape(cfg).linear_widths()  # what validation checks group sizes and loaders on
        assert set(inputs) == {i for i, _ in widths} and set(outputs) == {o for _, o in widths}, family.name


def test_unknown_families_fall_back_to_common_config_keys():
    cfg = {"model_type": "something-new", "n_positions": 512, "d_model": 96, "num_layers": 3}
    assert context_length(cfg) == (512, "n_positions") and hidden_size(cfg) == 96 and layer_count(cfg) == 3
    with pytest.raises(ValueError, match="does not support model_type 'something-new'"):
        model_shape(cfg)


@pytest.mark.parametrize("arch", NEW)
def test_new_families_quantize_export_and_reload(tmp_path, model_factory, arch):
    path = model_factory(arch)
    tokenizer, ctx = _context(path)
    ids = ctx.calibration[:2]
    model = load_model(str(path), "float32", "cpu")
    original = _logits(model, ids)
    rtn = load_model(str(path), "float32", "cpu")
    run_step(rtn, RtnConfig(bits=4, group_size=32, format="dense"), ctx)
    assert not torch.equal(_logits(rtn, ids), original)
    outcome = run_step(model, GptqConfig(bits=4, group_size=32), ctx)
    layers = len(decoder_layers(model))
    assert {s["layer"] for s in outcome.layers} == set(range(layers))
    assert all(0 < s["relative_output_error"] < 0.5 for s in outcome.layers)
    expected = _logits(model, ids)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    reloaded = load_model(str(tmp_path / "ckpt"), "float32", "cpu")
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == outcome.changed["modules_quantized"] > 0
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-3, atol=1e-3)


PRUNE_CASES = [
    ("gemma2", {"heads": 0.5, "mlp": 0.25, "layers": 1, "importance": "activation"}),
    ("gemma3", {"heads": {"keep": 2}, "mlp": 0.5, "layers": 1, "importance": "taylor"}),
    ("qwen3", {"heads": 0.25, "mlp": 0.25, "layers": 1, "importance": "activation"}),
    ("qwen3", {"mlp": {"keep": 64}, "layers": 1, "importance": "magnitude"}),
    ("phi3", {"mlp": 0.25, "layers": 1, "importance": "activation"}),
    ("phi3", {"mlp": 0.5, "importance": "taylor"}),
    ("phi3", {"mlp": 0.5, "importance": "magnitude"}),
    ("mistral_sliding", {"heads": 0.5, "mlp": 0.25, "layers": 1, "importance": "magnitude"}),
]


@pytest.mark.parametrize("arch,options", PRUNE_CASES, ids=[f"{a}-{o['importance']}" for a, o in PRUNE_CASES])
def test_new_families_prune_and_load_in_stock_transformers(tmp_path, model_factory, arch, options):
    path = model_factory(arch)
    tokenizer, ctx = _context(path, samples=8)
    model = load_model(str(path), "float32", "cpu")
    types_before = list(getattr(model.config, "layer_types", None) or [])
    window_layers = getattr(model.config, "max_window_layers", None)
    outcome = run_step(model, PruneConfig(**options), ctx)
    changed = outcome.changed
    assert changed["parameters_after"] < changed["parameters_before"]
    kept = [i for i in range(len(types_before) or changed["decoder_layers"][0]) if i not in changed["layers_removed"]]
    assert len(kept) == changed["decoder_layers"][1] == model.config.num_hidden_layers
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in kept]
    if window_layers is not None:
        assert model.config.max_window_layers == sum(1 for i in kept if i < window_layers)
    ids = ctx.calibration[:2]
    expected = _logits(model, ids)
    save_checkpoint(model, tokenizer, tmp_path / "pruned")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(stock, ids), expected, rtol=1e-4, atol=1e-4)
    assert stock.config.intermediate_size == changed["intermediate_size"][1]
    assert stock.config.num_attention_heads == changed["attention_heads"][1]
    if types_before:
        assert stock.config.layer_types == model.config.layer_types


def test_phi3_heads_are_refused_at_validation_with_the_reason(workdir, model_factory, recipe_writer):
    recipe = recipe_writer(model_factory("phi3"), steps="  - prune: {heads: 0.5, mlp: 0.25}")
    for command in ("validate", "run"):
        result = CliRunner().invoke(app, [command, str(recipe)])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "w4-rtn.yaml:12: steps[0].prune.heads:" in text and "Phi-3 splits its fused qkv_proj" in text
        assert "Traceback" not in result.output
    assert not (workdir / "out").exists()


def test_a_new_family_runs_end_to_end_prune_then_gptq(workdir, model_factory, recipe_writer):
    steps = ("  - prune: {mlp: 0.25, layers: 1, importance: activation}\n"
             "  - gptq: {bits: 4, group_size: 32}")
    recipe = recipe_writer(model_factory("gemma3"), steps=steps)
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    out = workdir / "out" / "w4-rtn"
    reloaded = load_model(str(out), "float32", "cpu")
    assert reloaded.config.num_hidden_layers == 2 and len(reloaded.config.layer_types) == 2
    assert any(isinstance(m, QuantLinear) for m in reloaded.modules())
