"""Shared fixtures: tiny randomly initialised models of real architectures,
a tiny byte-level BPE tokenizer, text files, and recipe writers. Every test
works offline in its own temporary folder."""

from __future__ import annotations

import textwrap
import shutil
from pathlib import Path

import pytest
import torch

CORPUS = [
    "def add(a, b):\n    return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container.",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)",
    "Raise ValueError when the argument is out of range.",
    "import os\nprint(os.getcwd())",
] * 20

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
_GEMMA = dict(_SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, word_embed_proj_dim=64)),
    # families whose layers differ (sliding-window and full attention, per-type rotary bases), q/k norms,
    # fused projections; sliding windows of 8 tokens, shorter than the tests' 32-token windows
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_GEMMA, layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_GEMMA, num_hidden_layers=3,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(_SMALL, num_hidden_layers=3, head_dim=16, use_sliding_window=True, sliding_window=8,
                   max_window_layers=1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_SMALL, pad_token_id=0)),
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", dict(_SMALL, sliding_window=8)),
}


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_model(arch: str, folder: Path, seed: int = 0) -> Path:
    import transformers

    config_cls, model_cls, kwargs = ARCHS[arch]
    tokenizer = make_tokenizer()
    config = getattr(transformers, config_cls)(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = build_model(arch, tmp_path_factory.mktemp(f"model-{arch}"))
        return cache[arch]

    return get


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temp folder with train/test text; the test runs inside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("\n\n".join(CORPUS[:60]) + "\n")
    (tmp_path / "data" / "test.txt").write_text("\n\n".join(reversed(CORPUS[:60])) + "\n")
    return tmp_path


@pytest.fixture
def local_model(model_factory, workdir):
    """The tiny Llama copied into the work folder (a run may then be pointed at it by a relative path)."""
    target = workdir / "models" / "llama"
    shutil.copytree(model_factory("llama"), target)
    return target


def write_recipe(folder: Path, model: Path, name: str = "w4-rtn", extra: str = "", steps: str | None = None,
                 budgets: str = "", output: str = "./out/w4-rtn") -> Path:
    steps = steps or "  - rtn: {bits: 4, group_size: 32, sym: true}"
    text = textwrap.dedent(f"""\
        version: 1
        name: {name}
        model: {model}
        dtype: float32
        device: auto
        seed: 0
        calibration:
          dataset: text:./data/train.txt
          samples: 4
          seqlen: 32
        steps:
        {{steps}}
        evaluate:
          perplexity: {{{{dataset: text:./data/test.txt, seqlen: 32}}}}
          latency: {{{{prompt_tokens: 8, new_tokens: 4, repeats: 2}}}}
        budgets:
        {{budgets}}
        output: {output}
        {extra}""").format(steps=steps, budgets=budgets or "  max_size_mb: 1000")
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def recipe_writer(workdir):
    def write(model: Path, **kw) -> Path:
        return write_recipe(workdir, model, **kw)

    return write
