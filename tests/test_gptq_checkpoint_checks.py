"""Issue 10 (GPTQ checkpoint items): format fields checked before loading, gptq_v2 zero points,
the fields written per method, the activation dtype of the kernels, and loader notes at validation."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmslim.cli import app
from llmslim.errors import ModelLoadError
from llmslim.evaluate import _linear_kernel
from llmslim.modeling import load_model, save_checkpoint
from llmslim.quant.packing import pack_cols, unpack_cols
from llmslim.recipe.steps import GptqConfig, RtnConfig
from llmslim.steps import run_step
from tests.test_gptq_step import _context


def _packed(tmp_path, model_factory, config, dtype="float32"):
    path = model_factory("llama")
    model = load_model(str(path), dtype, "cpu")
    tokenizer, ctx = _context(path)
    run_step(model, config, ctx)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    return model, tmp_path / "ckpt", ctx.calibration[:2]


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_fields_written_per_method(tmp_path, model_factory):
    _, folder, _ = _packed(tmp_path, model_factory, GptqConfig(bits=4, group_size=32, act_order=True))
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["static_groups"] is True and quant["desc_act"] is False and quant["damp_percent"] == 0.01
    _, folder, _ = _packed(tmp_path / "b", model_factory, GptqConfig(bits=4, group_size=32, act_order=False))
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["static_groups"] is False
    _, folder, _ = _packed(tmp_path / "c", model_factory, RtnConfig(bits=4, group_size=32))
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert not {"damp_percent", "static_groups", "true_sequential"} & set(quant)
    assert quant["meta"]["method"] == "rtn"


def test_gptq_v2_zero_points_read_without_the_v1_offset(tmp_path, model_factory):
    model, folder, ids = _packed(tmp_path, model_factory, RtnConfig(bits=4, group_size=32, sym=False))
    with torch.no_grad():
        expected = model(ids).logits
    state = load_file(folder / "model.safetensors")
    for name in [k for k in state if k.endswith(".qzeros")]:
        n = state[name.removesuffix("qzeros") + "scales"].shape[1]
        state[name] = pack_cols(unpack_cols(state[name], 4, n) + 1, 4)      # v2: the raw zero points
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _edit_config(folder, checkpoint_format="gptq_v2", format="gptq_v2")
    with torch.no_grad():
        got = load_model(str(folder), "float32", "cpu")(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    _edit_config(folder, checkpoint_format="gptq", format="gptq")            # read as v1: one step off
    with torch.no_grad():
        assert not torch.allclose(load_model(str(folder), "float32", "cpu")(ids).logits, expected, atol=1e-3)


@pytest.mark.parametrize("changes,message", [
    ({"checkpoint_format": "marlin", "format": "marlin"}, "checkpoint_format is 'marlin'"),
    ({"bits": 5}, "bits is 5"),
    ({"group_size": 0}, "group_size is 0"),
    ({"pack_dtype": "int16"}, "pack_dtype is 'int16'"),
    ({"sym": "yes"}, "sym is 'yes'"),
])
def test_unreadable_formats_are_refused_before_loading(tmp_path, model_factory, changes, message):
    _, folder, _ = _packed(tmp_path, model_factory, RtnConfig(bits=4, group_size=32))
    _edit_config(folder, **changes)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(folder), "float32", "cpu")
    result = CliRunner().invoke(app, ["eval", str(folder), "--dataset", "builtin:stdlib-docs:test", "--no-latency"])
    assert result.exit_code == 2 and "cannot load this GPTQ checkpoint" in result.output
    assert "Traceback" not in result.output


def test_linear_kernel_reports_the_activation_dtype(tmp_path, model_factory):
    model, _, ids = _packed(tmp_path, model_factory, GptqConfig(bits=4, group_size=32))
    with torch.no_grad():
        model(ids)
    assert _linear_kernel(model) == "dequant (float32 activations)"          # fp32: exact, not bf16-rounded
    model16, _, ids = _packed(tmp_path / "b", model_factory, GptqConfig(bits=4, group_size=32), "bfloat16")
    with torch.no_grad():
        model16(ids)
    assert _linear_kernel(model16) == "int4pack (bfloat16 activations)"


@pytest.fixture(scope="module")
def model_688(tmp_path_factory):
    """A Llama with hidden 192 and MLP 688 (no common group size divides them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("m688")
    config = LlamaConfig(hidden_size=192, intermediate_size=688, num_attention_heads=6, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=320, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _validate(recipe_writer, model, steps):
    return CliRunner().invoke(app, ["validate", str(recipe_writer(model, steps=steps))])


def test_partial_groups_validate_with_a_note(recipe_writer, model_688, caplog):
    with caplog.at_level(logging.WARNING, logger="llmslim"):
        result = _validate(recipe_writer, model_688, "  - gptq: {bits: 4, group_size: 128}")
    assert result.exit_code == 0, result.output
    notes = " ".join(r.getMessage() for r in caplog.records)
    assert "vllm-marlin cannot load the result" in notes and "[192, 688]" in notes
    assert 'backend="gptq_torch"' in notes


@pytest.mark.parametrize("step", ["gptq", "signround"])
def test_a_named_loader_that_cannot_take_the_widths_is_a_recipe_problem(recipe_writer, model_688, step):
    result = _validate(recipe_writer, model_688,
                       f"  - {step}: {{bits: 4, group_size: 128, format: gptq, loaders: [vllm-marlin]}}")
    assert result.exit_code == 2
    assert f"steps[0].{step}.loaders: vllm-marlin cannot load the result" in result.output
    assert "multiple of the group size" in result.output
    assert _validate(recipe_writer, model_688, "  - rtn: {bits: 4, group_size: 16, loaders: [llmslim]}").exit_code == 0
