"""Sharded safetensors output (llmslim.shards, save_checkpoint, the GPTQ loader) and the user's umask
on published files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from llmslim.cli import app
from llmslim.shards import (DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, SINGLE_FILE, ShardWriter, checkpoint_keys,
                            iter_checkpoint_tensors, parse_size, tensor_bytes)


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield 0o002
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("text, expected", [
    ("20GB", 20 * 10**9), ("512MB", 512 * 10**6), ("5GiB", 5 * 2**30), ("1.5 gb", 1_500_000_000),
    (" 64 KiB ", 65536), ("100", 100), (123, 123), ("2TB", 2 * 10**12), ("7B", 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("20XB", "unknown unit 'XB'"), ("GB", "not a size"), ("-5GB", "not a size"), ("0", "must be positive"),
    (True, "expected a size"), ("1e9", "not a size"), (0.5, "expected a size"),
])
def test_parse_size_refuses_with_a_readable_message(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def test_default_shard_size_is_transformers_own():
    import inspect

    from transformers import PreTrainedModel

    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert parse_size(default) == DEFAULT_MAX_SHARD_SIZE


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes = [100, 300, 50, 600, 20, 250, 10]  # float32: 400 .. 2400 bytes
    return {f"t{i}.weight": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("spool", [False, True])
def test_writer_shards_greedily_in_hf_layout(tmp_path, umask_002, spool):
    tensors = _tensors()
    limit = 1600
    with ShardWriter(tmp_path / "ckpt", max_shard_size=limit, metadata={"note": "x"}, spool=spool) as writer:
        for name, tensor in tensors.items():  # one at a time, as a streamed run adds them
            writer.add({name: tensor})
    folder = tmp_path / "ckpt"
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    count = len(shards)
    assert count == 4 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not (folder / SINGLE_FILE).exists()
    assert index["metadata"]["total_size"] == sum(tensor_bytes(t) for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt", "note": "x"}
            names = list(handle.keys())
            data = sum(tensor_bytes(handle.get_tensor(n)) for n in names)
        assert data <= limit or len(names) == 1  # only a tensor larger than the limit stands alone above it
    read = dict(iter_checkpoint_tensors(folder))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], v) for k, v in tensors.items())
    assert {k: v.name for k, v in checkpoint_keys(folder).items()} == index["weight_map"]
    assert {_mode(p) for p in folder.iterdir()} == {0o664} and _mode(folder) == 0o775
    assert not list(folder.glob(".*"))  # no temporary shard left


def test_writer_holds_at_most_one_shard(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size=1600)
    seen = []
    for name, tensor in _tensors().items():
        writer.add({name: tensor})
        seen.append(writer._pending_bytes)
    assert max(seen) <= 2400  # the largest tensor (2400 bytes) alone; otherwise at most the limit
    assert all(b <= 1600 for b in seen if b != 2400)
    writer.close()


def test_writer_copies_what_it_is_given(tmp_path):
    source = torch.zeros(8)
    writer = ShardWriter(tmp_path)
    writer.add({"a": source})
    source.fill_(7)  # the caller reuses its buffer (a streamed layer released) before the flush
    writer.close()
    assert torch.equal(dict(iter_checkpoint_tensors(tmp_path))["a"], torch.zeros(8))


def test_spooled_shards_read_like_safetensors_own(tmp_path):
    """A spooled writer keeps no tensor in memory and writes files safetensors reads back exactly, for
    every dtype a checkpoint holds (packed int32 codes, bfloat16, bool masks, scalars, empty tensors)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(3, 5, generator=gen), "h": torch.randn(7, generator=gen).to(torch.bfloat16),
               "f16": torch.randn(2, 2, generator=gen).half(), "q": torch.randint(-2**31, 2**31 - 1, (4, 3),
                                                                                 dtype=torch.int32),
               "u": torch.arange(9, dtype=torch.uint8), "m": torch.rand(5, generator=gen) > 0.5,
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "t": torch.randn(4, 6).t(),
               "i64": torch.arange(3), "i8": torch.arange(-3, 3, dtype=torch.int8), "i16": torch.arange(4).short(),
               "f64": torch.randn(2, dtype=torch.float64), "e4m3": torch.randn(4).to(torch.float8_e4m3fn),
               "e5m2": torch.randn(4).to(torch.float8_e5m2)}
    writer = ShardWriter(tmp_path / "spooled", max_shard_size=100, spool=True)
    for name, tensor in tensors.items():
        writer.add({name: tensor})
        assert all(value is None for value in writer._pending.values())
    writer.close()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "reference.safetensors"),
              metadata={"format": "pt"})
    with ShardWriter(tmp_path / "one", spool=True) as whole:
        whole.add(tensors)
    assert (tmp_path / "one" / SINGLE_FILE).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    ours = dict(iter_checkpoint_tensors(tmp_path / "spooled"))
    with safe_open(str(tmp_path / "reference.safetensors"), framework="pt") as handle:
        for name in tensors:
            theirs = handle.get_tensor(name)
            assert ours[name].dtype == theirs.dtype and ours[name].shape == theirs.shape
            assert torch.equal(ours[name], theirs), name
    assert not list((tmp_path / "spooled").glob(".*"))


def test_single_shard_replaces_a_stale_sharded_save(tmp_path):
    folder = tmp_path / "ckpt"
    with ShardWriter(folder, max_shard_size=1000) as writer:
        writer.add(_tensors())
    assert (folder / INDEX_FILE).exists()
    with ShardWriter(folder) as writer:
        writer.add({"only": torch.ones(3)})
    assert sorted(p.name for p in folder.iterdir()) == [SINGLE_FILE]
    assert list(checkpoint_keys(folder)) == ["only"]


@pytest.mark.parametrize("spool", [False, True])
def test_writer_refuses_a_duplicate_and_aborts_cleanly(tmp_path, spool):
    writer = ShardWriter(tmp_path, max_shard_size=500, spool=spool)
    writer.add({"a": torch.ones(200)})
    with pytest.raises(ValueError, match="already written"):
        writer.add({"a": torch.ones(2)})
    writer.add({"b": torch.ones(200)})  # flushes the first
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_keys_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        checkpoint_keys(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="no readable weight_map"):
        checkpoint_keys(tmp_path)


def test_sharded_dense_checkpoint_loads_and_passes_header_checks(tmp_path, model_factory):
    from transformers import AutoModelForCausalLM

    from llmslim.modeling import load_model, load_tokenizer, save_checkpoint
    from llmslim.weight_files import weights_problem

    src = model_factory("qwen2")
    model, tokenizer = load_model(str(src), "float32", "cpu"), load_tokenizer(str(src))
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", max_shard_size=40_000)
    shards = sorted((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "ckpt" / INDEX_FILE).is_file()
    assert weights_problem(tmp_path / "ckpt") is None
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_llmslim_gptq_loader_reads_sharded_checkpoints(tmp_path, model_factory):
    from llmslim.modeling import load_model, load_tokenizer, save_checkpoint
    from llmslim.progress import Progress
    from llmslim.quant.checkpoint import load_gptq_model
    from llmslim.recipe.steps import RtnConfig
    from llmslim.steps import StepContext, run_step

    src = model_factory("llama")
    model, tokenizer = load_model(str(src), "float32", "cpu"), load_tokenizer(str(src))
    ctx = StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                      calibration=None, model_path=src, dtype="float32")
    run_step(model, RtnConfig(bits=4, group_size=32), ctx)
    save_checkpoint(model, tokenizer, tmp_path / "q", max_shard_size=30_000)
    index = json.loads((tmp_path / "q" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 2 and any(k.endswith(".qweight") for k in index["weight_map"])
    loaded = load_gptq_model(tmp_path / "q", torch.float32)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=1e-5)


def test_apply_umask_opens_up_private_staging_files(tmp_path, umask_002):
    from llmslim.publish import apply_umask, user_umask

    assert user_umask() == 0o002
    folder = tmp_path / "staged"
    (folder / "sub").mkdir(parents=True)
    for path, mode in ((folder / "a.safetensors", 0o600), (folder / "sub" / "b.json", 0o600),
                       (folder / "run.sh", 0o700)):
        path.write_text("x")
        path.chmod(mode)
    folder.chmod(0o700)
    apply_umask(folder)
    assert _mode(folder) == 0o775 and _mode(folder / "sub") == 0o775
    assert _mode(folder / "a.safetensors") == 0o664 and _mode(folder / "sub" / "b.json") == 0o664
    assert _mode(folder / "run.sh") == 0o775


def test_run_publishes_a_sharded_gptq_output_with_the_users_umask(recipe_writer, model_factory, umask_002):
    from llmslim.quant.checkpoint import load_gptq_model
    from llmslim.report import read_report

    recipe = recipe_writer(model_factory("llama"), extra="memory: {{max_shard_size: 30KB}}",
                           steps="  - gptq: {bits: 4, group_size: 32}")
    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = recipe.parent / "out" / "w4-rtn"
    index = json.loads((out / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and not (out / SINGLE_FILE).exists()
    report = read_report(out)
    assert shards <= set(report.files) and INDEX_FILE in report.files
    assert {_mode(p) for p in out.iterdir()} == {0o664} and _mode(out) == 0o775
    model = load_gptq_model(out, torch.float32)  # refuses a checkpoint that lacks any tensor
    assert sum(k.endswith("qweight") for k in model.state_dict()) == 14  # 7 linears x 2 layers, all packed
    assert report.result.perplexity <= 1.1 * report.baseline.perplexity
