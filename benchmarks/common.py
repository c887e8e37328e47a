"""Shared helpers for the benchmarks: locating ../shared, data, timing, tables."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from llmslim.data import sample_windows, split_documents
from llmslim.evaluate.latency import measure_latency
from llmslim.evaluate.perplexity import eval_windows, perplexity, tokenize_text
from llmslim.modeling import load_model, load_tokenizer, save_checkpoint, weights_size_bytes
from llmslim.recipe.schema import LatencyConfig

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


def shared_or_skip(model: str, data: str) -> tuple[Path, Path]:
    """The shared model and data folders, or exit 0 saying why the benchmark is skipped."""
    model_dir, data_dir = SHARED / "models" / model, SHARED / "data" / data
    for path in (model_dir, data_dir):
        if not path.exists():
            print(f"skipping: {path} not found (benchmarks use ../shared when present)")
            sys.exit(0)
    return model_dir, data_dir


def load_windows(tokenizer, data_dir: Path, samples: int, seqlen: int, seed: int = 0):
    """(calibration windows from train.txt, evaluation windows of test.txt)."""
    train = split_documents((data_dir / "train.txt").read_text(encoding="utf-8"))
    test = split_documents((data_dir / "test.txt").read_text(encoding="utf-8"))
    calib = sample_windows(tokenize_text(tokenizer, train[:20000]), samples, seqlen, seed)
    return calib, eval_windows(tokenize_text(tokenizer, test), seqlen)


def decode_speed(model, repeats: int = 5, prompt: int = 64, new: int = 64) -> float:
    cfg = LatencyConfig(prompt_tokens=prompt, new_tokens=new, repeats=repeats, warmup=1)
    return measure_latency(model, cfg, seed=0).decode_tokens_per_s


def saved_size(model, tokenizer, folder: Path) -> int:
    save_checkpoint(model, tokenizer, folder)
    return weights_size_bytes(folder)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], table: str, meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{json.dumps(meta)}\n\n{table}\n")
    print(table)


__all__ = ["shared_or_skip", "load_windows", "decode_speed", "saved_size", "Timer", "markdown_table",
           "write_results", "perplexity", "load_model", "load_tokenizer", "torch"]


def peer_main(description: str, default_windows: int):
    """The command line of a side-by-side script (``--peer-python``, ``--eval-windows``) and its setup:
    (args, model folder, tokenizer, test windows, step context with 128 calibration windows, the
    original model's perplexity on those windows)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--peer-python", default="", help="python of a venv with gptqmodel and optimum")
    parser.add_argument("--eval-windows", type=int, default=default_windows,
                        help="test windows for every perplexity here (the peer runs fp16 on CPU, which is slow)")
    args = parser.parse_args()
    model_dir, tokenizer, windows, ctx = peer_setup(args.peer_python, 128, args.eval_windows)
    base = perplexity(load_model(str(model_dir), "float32", "cpu"), windows, batch_size=8)
    return args, model_dir, tokenizer, windows, ctx, base


def peer_setup(peer_python: str, samples: int, eval_windows: int):
    """For a side-by-side with GPTQModel on the 9M model: (model folder, tokenizer, the first
    ``eval_windows`` test windows, a step context with ``samples`` calibration windows of 256 tokens);
    exits 0 saying why when ../shared or the peer interpreter is absent."""
    from llmslim.progress import Progress
    from llmslim.steps import StepContext

    model_dir, data_dir = shared_or_skip("pydocs-llama-9m", "pydocs")
    if not peer_python or not Path(peer_python).exists():
        print("skipping: no --peer-python with gptqmodel (see ../shared/notes/peers-cpu.md)")
        sys.exit(0)
    tokenizer = load_tokenizer(str(model_dir))
    calib, windows = load_windows(tokenizer, data_dir, samples, 256)
    ctx = StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                      calibration=calib)
    return model_dir, tokenizer, windows[:eval_windows], ctx
