"""Streamed models (llmslim/streaming.py): one decoder layer materialised at a
time, perplexity layer by layer equal to the in-memory path, tied weights kept
tied, computed buffers, sharded inputs, and gptq/rtn written layer by layer
with the very tensors a resident run saves."""

from __future__ import annotations

import json

import pytest
import torch

from llmslim.evaluate.perplexity import mean_nll
from llmslim.evaluate.streamed import streamed_mean_nll
from llmslim.modeling import decoder_layers, load_model, load_tokenizer, save_checkpoint
from llmslim.progress import Progress
from llmslim.recipe.steps import GptqConfig, RtnConfig
from llmslim.shards import iter_checkpoint_tensors
from llmslim.steps import StepContext, run_step
from llmslim.stream_run import write_streamed_step
from llmslim.streaming import LazyModel, is_materialised

CPU = torch.device("cpu")


def _windows(count=5, seqlen=32, seed=0):
    return torch.randint(0, 300, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def _watch_layers(lazy: LazyModel, seen: list[int]):
    """Record, at every layer load, how many decoder layers hold data (the new one included)."""
    real = lazy.load_layer

    def load(index, device):
        layer = real(index, device)
        seen.append(sum(is_materialised(layer) for layer in lazy.layers))
        return layer

    lazy.load_layer = load


def _tensors(folder):
    return dict(iter_checkpoint_tensors(folder))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_streamed_perplexity_equals_in_memory(model_factory, arch):
    path = model_factory(arch)
    windows = _windows()
    expected = mean_nll(load_model(str(path), "float32"), windows, batch_size=2)
    lazy = LazyModel(path, "float32")
    seen: list[int] = []
    _watch_layers(lazy, seen)
    got = streamed_mean_nll(lazy, windows, device=CPU, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-4)
    assert seen == [1] * len(lazy.layers) and lazy.peak_loaded == 1
    assert not is_materialised(lazy.model)  # everything went back to the meta device


def test_tied_embeddings_stay_one_parameter(model_factory):
    lazy = LazyModel(model_factory("gpt2"), "float32")
    lazy.load_outer(CPU)
    head, embed = lazy.model.get_output_embeddings().weight, lazy.model.get_input_embeddings().weight
    assert head is embed and head.device.type == "cpu"
    assert "lm_head.weight" not in lazy.saved_keys()
    lazy.release_outer()
    assert lazy.model.get_output_embeddings().weight is lazy.model.get_input_embeddings().weight


def test_computed_buffers_match_a_loaded_model(model_factory):
    """Rotary tables and Gemma's embedding scale are not in the checkpoint: they are computed."""
    path = model_factory("gemma2")
    loaded = dict(load_model(str(path), "float32").named_buffers())
    lazy = LazyModel(path, "float32")
    lazy.load_outer(CPU)
    ours = dict(lazy.model.named_buffers())
    assert set(loaded) == set(ours) and loaded
    for name, value in loaded.items():
        assert torch.equal(ours[name], value), name


def test_sharded_checkpoint_streams_like_a_single_file(model_factory, tmp_path):
    path = model_factory("llama")
    model = load_model(str(path), "float32")
    save_checkpoint(model, load_tokenizer(str(path)), tmp_path / "sharded", 40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    windows = _windows()
    single = streamed_mean_nll(LazyModel(path, "float32"), windows, device=CPU, batch_size=5)
    sharded = streamed_mean_nll(LazyModel(tmp_path / "sharded", "float32"), windows, device=CPU, batch_size=5)
    assert sharded == single


def test_bfloat16_skeleton_reads_float32_weights_as_bfloat16(model_factory):
    path = model_factory("llama")
    windows = _windows(count=3)
    expected = mean_nll(load_model(str(path), "bfloat16"), windows)
    lazy = LazyModel(path, "bfloat16")
    assert lazy.model.dtype == torch.bfloat16
    assert streamed_mean_nll(lazy, windows, device=CPU) == pytest.approx(expected, rel=1e-4)


def _context(path, samples=4, seqlen=32):
    from llmslim.data import sample_windows
    from llmslim.evaluate.perplexity import tokenize_text
    from tests.conftest import CORPUS

    tokenizer = load_tokenizer(str(path))
    windows = sample_windows(tokenize_text(tokenizer, CORPUS), samples, seqlen, seed=0)
    return tokenizer, StepContext(tokenizer=tokenizer, device=CPU, seed=0, progress=Progress(quiet=True),
                                  calibration=windows)


def resident_and_streamed(model_factory, tmp_path, arch, step):
    """The step run on a loaded model and saved (tmp_path/resident), and streamed (tmp_path/streamed):
    (the resident model, both outcomes, the count of materialised layers at every layer load)."""
    path = model_factory(arch)
    tokenizer, ctx = _context(path)
    model = load_model(str(path), "float32")
    resident = run_step(model, step, ctx)
    save_checkpoint(model, tokenizer, tmp_path / "resident")
    lazy = LazyModel(path, "float32")
    seen: list[int] = []
    _watch_layers(lazy, seen)
    streamed = write_streamed_step(lazy, step, ctx, tmp_path / "streamed", tokenizer, max_shard_size=10**9)
    return model, resident, streamed, seen


@pytest.mark.parametrize("arch,step", [
    ("llama", GptqConfig(bits=4, group_size=32)),
    ("opt", GptqConfig(bits=3, group_size=32, format="dense")),
    ("gpt2", RtnConfig(bits=4, group_size=32)),
])
def test_streamed_step_writes_the_resident_checkpoint(model_factory, tmp_path, arch, step):
    model, resident, streamed, seen = resident_and_streamed(model_factory, tmp_path, arch, step)
    assert seen == [1] * len(decoder_layers(model))
    ours, theirs = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "resident")
    assert list(ours) == list(theirs) or sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "resident" / "config.json").read_text())
    assert streamed.changed["modules_quantized"] == resident.changed["modules_quantized"] > 0
    assert streamed.changed["weights_quantized"] == resident.changed["weights_quantized"]
    assert [row.get("kernel") for row in streamed.layers] == [row.get("kernel") for row in resident.layers]
    assert (tmp_path / "streamed" / "tokenizer.json").is_file()
    # the written (packed) checkpoint streams too, with the perplexity of the resident result
    windows = _windows(count=3)
    assert streamed_mean_nll(LazyModel(tmp_path / "streamed", "float32"), windows, device=CPU) == \
        pytest.approx(mean_nll(model, windows), rel=1e-4)


def test_streamed_step_shards_its_output(model_factory, tmp_path):
    path = model_factory("llama")
    tokenizer, ctx = _context(path)
    write_streamed_step(LazyModel(path, "float32"), RtnConfig(bits=8, group_size=32), ctx, tmp_path / "out",
                        tokenizer, max_shard_size=30_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "out" / f).is_file() for f in files)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    reloaded = load_model(str(tmp_path / "out"), "float32")
    windows = _windows(count=2)
    assert streamed_mean_nll(LazyModel(tmp_path / "out", "float32"), windows, device=CPU) == \
        pytest.approx(mean_nll(reloaded, windows), rel=1e-4)


def test_host_activations_move_per_call(model_factory):
    """Inputs kept elsewhere than the compute device are moved for each call (here both are the CPU,
    so the numbers must be those of inputs kept on the device)."""
    path = model_factory("llama")
    windows = _windows()
    on_device = streamed_mean_nll(LazyModel(path, "float32"), windows, device=CPU, batch_size=2)
    on_host = streamed_mean_nll(LazyModel(path, "float32"), windows, device=CPU, batch_size=2,
                                activations=torch.device("cpu"))
    assert on_host == on_device


def test_prefetch_reads_the_next_layer_ahead_with_the_same_result(model_factory, tmp_path):
    path = model_factory("qwen3")
    windows = _windows()
    plain = streamed_mean_nll(LazyModel(path, "float32"), windows, device=CPU, batch_size=5)
    lazy = LazyModel(path, "float32", prefetch=True)
    reads = []
    real = lazy._read_ahead
    lazy._read_ahead = lambda wanted, pin: reads.append(sorted(wanted)) or real(wanted, pin)
    assert streamed_mean_nll(lazy, windows, device=CPU, batch_size=5) == plain
    assert len(reads) == len(lazy.layers) - 1 and all(k.startswith("model.layers.") for k in reads[0])
    assert lazy.peak_loaded == 1 and not lazy._ahead
    # a streamed step with prefetch writes the same checkpoint
    tokenizer, ctx = _context(path)
    step = RtnConfig(bits=4, group_size=16)
    write_streamed_step(LazyModel(path, "float32"), step, ctx, tmp_path / "plain", tokenizer, max_shard_size=10**9)
    write_streamed_step(LazyModel(path, "float32", prefetch=True), step, ctx, tmp_path / "ahead", tokenizer,
                        max_shard_size=10**9)
    ours, theirs = _tensors(tmp_path / "ahead"), _tensors(tmp_path / "plain")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    lazy.close()
