"""Structured pruning and per-weight sparsity streamed one decoder layer at a
time: the same checkpoint, config and report as the resident step, on several
families, with one layer materialised at a time; the steps that need the whole
model are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from llmslim.errors import StepError
from llmslim.evaluate.perplexity import mean_nll
from llmslim.evaluate.streamed import streamed_mean_nll
from llmslim.modeling import decoder_layers, load_model
from llmslim.recipe.steps import GptqConfig, PruneConfig, SparsifyConfig
from llmslim.stream_run import write_streamed_step
from llmslim.streaming import LazyModel
from tests.test_streaming import CPU, _context, _tensors, _windows, resident_and_streamed

STREAMED = [
    ("llama", PruneConfig(heads=0.5, mlp=0.25)),
    ("qwen2", PruneConfig(mlp=0.5, importance="magnitude")),
    ("gpt2", PruneConfig(mlp=0.25)),
    ("mistral", PruneConfig(heads=0.5)),
    ("llama", SparsifyConfig(method="wanda", sparsity=0.5)),
    ("opt", SparsifyConfig(method="sparsegpt", pattern="2:4")),
    ("gpt2", SparsifyConfig(method="magnitude", sparsity=0.6)),
]


@pytest.mark.parametrize("arch,step", STREAMED)
def test_streamed_pruning_writes_the_resident_checkpoint(model_factory, tmp_path, arch, step):
    model, resident, streamed, seen = resident_and_streamed(model_factory, tmp_path, arch, step)
    assert seen == [1] * len(decoder_layers(model))  # each layer loaded once, alone
    ours, theirs = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "resident")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and torch.equal(ours[key], value), key
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "resident" / "config.json").read_text())
    same = {k: v for k, v in resident.changed.items() if k != "seconds" and not k.endswith("_seconds")}
    assert {k: streamed.changed.get(k) for k in same} == same
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in streamed.layers] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in resident.layers]
    windows = _windows(count=3)
    assert streamed_mean_nll(LazyModel(tmp_path / "streamed", "float32"), windows, device=CPU) == \
        pytest.approx(mean_nll(model, windows), rel=1e-4)


def test_streamed_pruning_shrinks_the_checkpoint(model_factory, tmp_path):
    model, _, streamed, _ = resident_and_streamed(model_factory, tmp_path, "llama",
                                                   PruneConfig(heads=0.5, mlp=0.25))
    reloaded = load_model(str(tmp_path / "streamed"), "float32")
    assert reloaded.config.intermediate_size == 96 and reloaded.config.num_attention_heads == 2
    assert streamed.changed["parameters_after"] == sum(p.numel() for p in reloaded.parameters()) \
        < streamed.changed["parameters_before"]


def test_zeros_of_a_streamed_sparsify_survive_a_streamed_gptq(model_factory, tmp_path):
    path = model_factory("llama")
    tokenizer, ctx = _context(path)
    write_streamed_step(LazyModel(path, "float32"), SparsifyConfig(method="wanda", pattern="2:4"), ctx,
                        tmp_path / "sparse", tokenizer, max_shard_size=10**9)
    write_streamed_step(LazyModel(tmp_path / "sparse", "float32"), GptqConfig(bits=4, group_size=32, format="dense"),
                        ctx, tmp_path / "quant", tokenizer, max_shard_size=10**9)
    sparse, quant = _tensors(tmp_path / "sparse"), _tensors(tmp_path / "quant")
    linears = [k for k in sparse if ".layers." in k and k.endswith("proj.weight")]
    assert linears
    for key in linears:
        groups = sparse[key].reshape(-1, 4)
        assert ((groups != 0).sum(1) <= 2).all(), key
        assert torch.equal(quant[key][sparse[key] == 0], torch.zeros_like(quant[key][sparse[key] == 0])), key


@pytest.mark.parametrize("step,why", [
    (PruneConfig(layers=1), "ranks every layer"),
    (PruneConfig(mlp=0.25, importance="taylor"), "gradients"),
    (SparsifyConfig(method="taylor", sparsity=0.5), "gradients"),
    (SparsifyConfig(method="wanda", sparsity=0.5, rounds=2, recover={"dataset": "builtin:tiny", "tokens": 64}),
     "distillation"),
])
def test_steps_that_need_the_whole_model_do_not_stream(model_factory, tmp_path, step, why):
    assert why in step.stream_problem()
    path = model_factory("llama")
    tokenizer, ctx = _context(path)
    with pytest.raises(StepError, match="cannot run streamed"):
        write_streamed_step(LazyModel(path, "float32"), step, ctx, tmp_path / "out", tokenizer, max_shard_size=10**9)
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True
