"""Text datasets, calibration windows and the perplexity protocol."""

from __future__ import annotations

import math

import pytest
import torch

from llmslim.data import join_documents, parse_dataset, sample_windows, split_documents, load_documents
from llmslim.errors import UsageError
from llmslim.evaluate.perplexity import eval_windows, perplexity, tokenize_text


def test_documents_split_on_blank_lines_and_keep_their_text():
    text = "def f():\n    return 1\n\n  \t\nsecond doc\n  indented line\n\n\n\nthird\n\n\n"
    assert split_documents(text) == ["def f():\n    return 1", "second doc\n  indented line", "third"]
    assert split_documents("a\r\n\r\nb\r\n") == ["a", "b"]


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_documents(parse_dataset(f"jsonl:{path}#text")) == ["one", "two"]
    path.write_text('{"other": 1}\n')
    with pytest.raises(UsageError, match=":1: cannot read field 'text'"):
        load_documents(parse_dataset(f"jsonl:{path}#text"))


def test_sample_windows_seeded_and_bounded():
    ids = torch.arange(100)
    a, b = sample_windows(ids, 5, 10, seed=1), sample_windows(ids, 5, 10, seed=1)
    assert a.shape == (5, 10) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 9, dtype=torch.long))
    with pytest.raises(UsageError, match="fewer than one window"):
        sample_windows(torch.arange(5), 1, 10, seed=0)


def _reference_perplexity(model, tokenizer, docs, seqlen):
    """An independent implementation: the model's own loss per window."""
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids
    n = ids.shape[1] // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(n):
            window = ids[:, i * seqlen : (i + 1) * seqlen]
            nlls.append(model(window, labels=window).loss.float() * seqlen)
    return math.exp(torch.stack(nlls).sum() / (n * seqlen))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_matches_an_independent_implementation(model_factory, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import CORPUS

    path = model_factory(arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    docs = CORPUS[:30]
    windows = eval_windows(tokenize_text(tokenizer, docs), 32)
    ours = perplexity(model, windows, batch_size=3)
    assert ours == pytest.approx(_reference_perplexity(model, tokenizer, docs, 32), rel=1e-4)
    assert join_documents(["a", "b"]) == "a\n\nb"
