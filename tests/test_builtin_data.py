"""The builtin stdlib-docstring datasets and the demo model that ships with llmslim."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from llmslim.builtin_data import BUILTIN_DATASETS, load_builtin, stdlib_docstrings

DEMO = Path(__file__).resolve().parent.parent / "llmslim" / "demo_model"


def test_splits_disjoint_deterministic_and_sized():
    train, test = load_builtin("stdlib-docs:train"), load_builtin("stdlib-docs:test")
    assert set(BUILTIN_DATASETS) == {"stdlib-docs:train", "stdlib-docs:test"}
    assert len(train) > 1000 and len(test) > 20
    assert not set(train) & set(test)
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert all(len(d) >= 60 for d in train + test)
    assert all(zlib.crc32(d.encode()) % 20 == 0 for d in test)
    assert all(zlib.crc32(d.encode()) % 20 != 0 for d in train[:500])
    # a fresh collection (cache cleared) gives the same documents in the same order
    stdlib_docstrings.cache_clear()
    assert load_builtin("stdlib-docs:train") == train and load_builtin("stdlib-docs:test") == test
    # callers get their own list; the cache cannot be changed through it
    train.clear()
    assert load_builtin("stdlib-docs:train")


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown builtin dataset 'nope'; known: stdlib-docs:test, stdlib-docs:train"):
        load_builtin("nope")


def test_demo_model_loads_and_is_trained():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "TRAINING.json"):
        assert (DEMO / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    text = "Return the number of items in the container."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == text
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    record = json.loads((DEMO / "TRAINING.json").read_text())
    ppl = record["perplexity"]
    assert record["script"] == "scripts/train_demo_model.py"
    assert ppl["trained"] < ppl["untrained"] / 20
    assert sum(f.stat().st_size for f in DEMO.iterdir()) < 10e6
