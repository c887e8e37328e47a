"""GGUF files as a model source: a tiny Llama written as GGUF in the test itself
(F32, or Q4_1 linears and Q8_0 embeddings like llama.cpp's Q4_1 files), validated
from its header, converted once into the cache, and run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmslim.cli import app

gguf = pytest.importorskip("gguf")

runner = CliRunner()

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    _, _, index, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{index}.{_LAYER_NAMES[rest]}"


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k (rotary halves interleaved); transformers undoes it on load."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _tensor_data(name: str, weight, quantized: bool):
    """(array, raw type or None): Q8_0 embeddings/output and Q4_1 linears, as in a Q4_1 file."""
    array = weight.detach().float().numpy()
    if not quantized or array.ndim == 1:
        return array, None
    qtype = gguf.GGMLQuantizationType.Q8_0 if name in ("token_embd.weight", "output.weight") \
        else gguf.GGMLQuantizationType.Q4_1
    return gguf.quants.quantize(array, qtype), qtype


def _add_tokenizer(writer, tokenizer) -> None:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)


def write_tiny_gguf(model_dir: Path, target: Path, quantized: bool) -> Path:
    """The HF model in ``model_dir`` written as a llama GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if quantized else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer)
    for hf_name, weight in model.state_dict().items():
        if hf_name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, cfg.num_key_value_heads)
        name = gguf_name(hf_name)
        data, raw = _tensor_data(name, weight, quantized)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    from tests.conftest import build_model

    folder = tmp_path_factory.mktemp("gguf-src")
    hf = build_model("llama", folder / "hf")
    return {"hf": hf, "f32": write_tiny_gguf(hf, folder / "tiny-f32.gguf", quantized=False),
            "q4": write_tiny_gguf(hf, folder / "tiny-q4_1.gguf", quantized=True)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "llmslim-cache"
    monkeypatch.setenv("LLMSLIM_CACHE", str(root))
    return root / "gguf"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 123, 7, 250, 3]])


def test_f32_gguf_converts_to_the_hf_model_it_was_written_from(gguf_files, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmslim.gguf import converted_folder

    folder = converted_folder(gguf_files["f32"])
    assert folder.parent == cache and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    original = AutoModelForCausalLM.from_pretrained(gguf_files["hf"], dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(_logits(converted, IDS), _logits(original, IDS), rtol=0, atol=1e-5)
    text = "def add(a, b):\n    return a + b. The quick brown fox"
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids == \
        AutoTokenizer.from_pretrained(gguf_files["hf"])(text).input_ids


def test_quantized_gguf_converts_once_into_the_cache_with_the_gguf_logits(gguf_files, cache):
    from transformers import AutoModelForCausalLM

    from llmslim.gguf import converted_folder, file_sha256, gguf_source_info

    path = gguf_files["q4"]
    info = gguf_source_info(path)
    assert info["format"] == "gguf" and info["file"] == str(path) and info["sha256"] == file_sha256(path)
    assert info["file_type"] == "MOSTLY_Q4_1" and info["architecture"] == "llama"
    assert info["tensor_types"] == {"F32": 5, "Q4_1": 14, "Q8_0": 2}
    folder = converted_folder(path)
    assert folder == cache / info["sha256"]
    assert json.loads((folder / "gguf_source.json").read_text()) == info
    from_gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(_logits(converted, IDS), _logits(from_gguf, IDS), rtol=0, atol=1e-6)
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert converted_folder(path) == folder and weights.stat().st_mtime_ns == before, "converted only once"
    assert sorted(p.name for p in cache.iterdir()) == [info["sha256"]], "no staging folder left behind"
    assert sorted(p.name for p in path.parent.iterdir()) == ["hf", "tiny-f32.gguf", "tiny-q4_1.gguf"]


def test_cache_root_prefers_llmslim_cache_then_xdg(monkeypatch, tmp_path):
    from llmslim.gguf import cache_root

    monkeypatch.setenv("LLMSLIM_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "own" / "gguf"
    monkeypatch.delenv("LLMSLIM_CACHE")
    assert cache_root() == tmp_path / "xdg" / "llmslim" / "gguf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "llmslim" / "gguf"


def test_validation_locates_a_missing_or_unreadable_gguf(recipe_writer, workdir, cache):
    recipe = recipe_writer("./absent.gguf")
    result = invoke("validate", recipe)
    assert result.exit_code == 2
    assert f"w4-rtn.yaml:3: model: model GGUF file not found: {workdir / 'absent.gguf'}" in result.output
    (workdir / "broken.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    result = invoke("validate", recipe_writer("./broken.gguf"))
    assert result.exit_code == 2 and "cannot read the GGUF header" in result.output
    assert "Traceback" not in result.output and not cache.exists()


def test_validation_without_the_gguf_package_names_the_extra(gguf_files, recipe_writer, workdir, monkeypatch):
    (workdir / "tiny.gguf").write_bytes(gguf_files["q4"].read_bytes())
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: find_spec gives None, import fails
    result = invoke("validate", recipe_writer("./tiny.gguf"))
    assert result.exit_code == 2
    assert "w4-rtn.yaml:3: model:" in result.output and "pip install 'llmslim-cli[gguf]'" in result.output


def test_dry_run_reads_only_the_header(gguf_files, recipe_writer, workdir, cache):
    (workdir / "tiny.gguf").write_bytes(gguf_files["q4"].read_bytes())
    result = invoke("run", recipe_writer("./tiny.gguf"), "--dry-run")
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(gguf_files["hf"]).parameters())
    assert f"{params:,}" in result.output or str(params) in result.output
    assert not cache.exists(), "a plan converts nothing"
    assert not (workdir / "out").exists()


def test_run_on_a_gguf_file_writes_an_ordinary_checkpoint(gguf_files, recipe_writer, workdir, cache):
    from llmslim.modeling import load_model

    (workdir / "tiny.gguf").write_bytes(gguf_files["q4"].read_bytes())
    recipe = recipe_writer("./tiny.gguf")
    result = invoke("run", recipe, "--json")
    assert result.exit_code == 0, result.output
    out = workdir / "out" / "w4-rtn"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "passed" and report["recipe"]["model"] == str(workdir / "tiny.gguf")
    assert report["steps"][0]["changed"]["modules_quantized"] == 2 * 7
    source = report["environment"]["model_source"]
    assert source == report["recipe"]["source"] and source["format"] == "gguf"
    assert source["tensor_types"].get("Q4_1", 0) > 0 and len(source["sha256"]) == 64
    model = load_model(str(out))
    assert model(IDS).logits.shape == (1, IDS.shape[1], model.config.vocab_size)
    assert len(list(cache.iterdir())) == 1
    again = invoke("run", recipe)
    assert again.exit_code == 0 and "up to date" in again.output
