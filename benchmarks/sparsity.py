"""Per-weight sparsity on the 9M reference model (issue 14).

Protocol (small on purpose: the CPU is shared):

* model: ../shared/models/pydocs-llama-9m (float32); data ../shared/data/pydocs;
* calibration: --samples windows (default 32) of --seqlen tokens (128) from train.txt, seed 0;
* perplexity: the first --eval-windows (32) windows of 256 tokens of test.txt;
* one-shot: 50% unstructured and 2:4 with magnitude, wanda, sparsegpt and taylor, every linear of
  every decoder layer (lm_head and embeddings dense);
* schedules, for --schedule-methods (default wanda, magnitude) at 50% unstructured: 3 rounds of
  pruning, each followed by distillation from the original model with --round-tokens tokens (default
  65,536; seqlen 128, batch 8, lr 1e-3, KL at T=2, train.txt with a held-out slice), against one-shot
  plus a single distillation of 3 x --round-tokens: the same total budget.

Writes results/sparsity.json and results/sparsity.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import load_model, load_tokenizer, load_windows, markdown_table, perplexity, shared_or_skip, torch, \
    write_results

from llmslim.progress import Progress
from llmslim.recipe.steps import DistillConfig, SparsifyConfig
from llmslim.steps.base import StepContext
from llmslim.steps.sparsify import apply_sparsify


def _ctx(tokenizer, calib, model_dir: Path) -> StepContext:
    return StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                       calibration=calib, model_path=model_dir, dtype="float32")


def _run(model_dir, tokenizer, calib, evals, config: SparsifyConfig) -> dict:
    model = load_model(str(model_dir), "float32")
    start = time.perf_counter()
    outcome = apply_sparsify(model, config, _ctx(tokenizer, calib, model_dir))
    seconds = time.perf_counter() - start
    return {"sparsity": outcome.changed["sparsity"], "perplexity": round(perplexity(model, evals), 3),
            "seconds": round(seconds, 1),
            "distill_tokens": outcome.changed.get("recover_tokens_total", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--round-tokens", type=int, default=65_536)
    parser.add_argument("--schedule-methods", default="wanda,magnitude")
    parser.add_argument("--skip-one-shot", action="store_true", help="only the schedule comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_dir, data_dir = shared_or_skip("pydocs-llama-9m", "pydocs")
    tokenizer = load_tokenizer(str(model_dir))
    calib, evals = load_windows(tokenizer, data_dir, args.samples, args.seqlen)
    evals = load_windows(tokenizer, data_dir, 1, 256)[1][: args.eval_windows]
    dense = load_model(str(model_dir), "float32")
    base = perplexity(dense, evals)
    rows = [{"method": "dense", "target": "-", "schedule": "-", "perplexity": round(base, 3), "sparsity": 0.0}]
    meta = {"model": "pydocs-llama-9m", "calibration": f"{args.samples} x {args.seqlen}",
            "eval": f"{len(evals)} x 256 tokens of test.txt", "round_tokens": args.round_tokens,
            "threads": torch.get_num_threads()}
    for target in () if args.skip_one_shot else ({"sparsity": 0.5}, {"pattern": "2:4"}):
        for method in ("magnitude", "wanda", "sparsegpt", "taylor"):
            row = _run(model_dir, tokenizer, calib, evals, SparsifyConfig(method=method, **target))
            rows.append({"method": method, "target": str(next(iter(target.values()))), "schedule": "one-shot", **row})
            _write(rows, base, meta)
    recover = dict(dataset=f"text:{data_dir / 'train.txt'}", seqlen=128, batch_size=8, lr=1e-3, eval_every=0,
                   eval_windows=16, checkpoint_every=10_000)
    for method in filter(None, args.schedule_methods.split(",")):
        for rounds, tokens in ((1, 3 * args.round_tokens), (3, args.round_tokens)):
            config = SparsifyConfig(method=method, sparsity=0.5, rounds=rounds,
                                    recover=DistillConfig(tokens=tokens, **recover))
            row = _run(model_dir, tokenizer, calib, evals, config)
            label = "one-shot + distill" if rounds == 1 else f"{rounds} rounds + distill each"
            rows.append({"method": method, "target": "0.5", "schedule": label, **row})
            _write(rows, base, meta)


def _write(rows: list[dict], base: float, meta: dict) -> None:
    """The rows so far (each run rewrites the results, so an interrupted run keeps what it measured)."""
    for row in rows:
        row["increase"] = f"{row['perplexity'] / base - 1:+.1%}"
    table = markdown_table(rows, ["method", "target", "schedule", "sparsity", "perplexity", "increase",
                                  "distill_tokens", "seconds"])
    write_results("sparsity", rows, table, meta)


if __name__ == "__main__":
    main()
