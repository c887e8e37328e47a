"""Per-weight sparsity on the 9M reference model (issue 14).

Protocol (small on purpose: the CPU is shared):

* model: ../shared/models/pydocs-llama-9m (float32); data ../shared/data/pydocs;
* calibration: --samples windows (default 32) of --seqlen tokens (128) from train.txt, seed 0;
* perplexity: the first --eval-windows (32) windows of 256 tokens of test.txt;
* one-shot: 50% unstructured and 2:4 with magnitude, wanda, sparsegpt and taylor, every linear of
  every decoder layer (lm_head and embeddings dense);
* schedules, for --schedule-methods (default wanda, magnitude) at each --schedule-targets sparsity
  (default 0.5, 0.7): 3 rounds of pruning, each followed by distillation from the original model
  with --round-tokens tokens (default 65,536; seqlen 128, batch 8, lr 1e-3, KL at T=2, train.txt
  with a held-out slice), against one-shot plus a single distillation of 3 x --round-tokens: the
  same total budget; and, for reference, the one-shot row without recovery at that target.

Writes results/sparsity.json and results/sparsity.md after every row; rows already there (same
method, target, schedule and token budget) are kept and not measured again (--fresh remeasures).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, load_model, load_tokenizer, load_windows, markdown_table, perplexity, shared_or_skip, \
    torch, write_results

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
    parser.add_argument("--schedule-targets", default="0.5,0.7")
    parser.add_argument("--skip-one-shot", action="store_true", help="only the schedule comparison")
    parser.add_argument("--fresh", action="store_true", help="remeasure every row")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_dir, data_dir = shared_or_skip("pydocs-llama-9m", "pydocs")
    tokenizer = load_tokenizer(str(model_dir))
    calib, evals = load_windows(tokenizer, data_dir, args.samples, args.seqlen)
    evals = load_windows(tokenizer, data_dir, 1, 256)[1][: args.eval_windows]
    rows = _previous(args.fresh)
    meta = {"model": "pydocs-llama-9m", "calibration": f"{args.samples} x {args.seqlen}",
            "eval": f"{len(evals)} x 256 tokens of test.txt", "threads": torch.get_num_threads(),
            "recovery": "KL (T=2) from the original model, seqlen 128, batch 8, lr 1e-3, train.txt"}
    dense = _find(rows, "dense", "-", "-") or _add(rows, {"method": "dense", "target": "-", "schedule": "-",
                                                         "perplexity": round(perplexity(load_model(
                                                             str(model_dir), "float32"), evals), 3),
                                                         "sparsity": 0.0})
    base = dense["perplexity"]
    one_shot = [] if args.skip_one_shot else [({"sparsity": 0.5}, m) for m in METHODS] + \
        [({"pattern": "2:4"}, m) for m in METHODS]
    targets = [float(t) for t in args.schedule_targets.split(",") if t.strip()]
    one_shot += [({"sparsity": t}, m) for t in targets for m in filter(None, args.schedule_methods.split(","))]
    for target, method in one_shot:
        label = str(next(iter(target.values())))
        if _find(rows, method, label, "one-shot") is None:
            row = _run(model_dir, tokenizer, calib, evals, SparsifyConfig(method=method, **target))
            _add(rows, {"method": method, "target": label, "schedule": "one-shot", **row})
            _write(rows, base, meta)
    recover = dict(dataset=f"text:{data_dir / 'train.txt'}", seqlen=128, batch_size=8, lr=1e-3, eval_every=0,
                   eval_windows=16, checkpoint_every=10_000)
    for target in targets:
        for method in filter(None, args.schedule_methods.split(",")):
            for rounds, tokens in ((1, 3 * args.round_tokens), (3, args.round_tokens)):
                label = "one-shot + distill" if rounds == 1 else f"{rounds} rounds + distill each"
                if _find(rows, method, str(target), label, rounds * tokens) is not None:
                    continue
                config = SparsifyConfig(method=method, sparsity=target, rounds=rounds,
                                        recover=DistillConfig(tokens=tokens, **recover))
                row = _run(model_dir, tokenizer, calib, evals, config)
                _add(rows, {"method": method, "target": str(target), "schedule": label, **row})
                _write(rows, base, meta)
    _write(rows, base, meta)


METHODS = ("magnitude", "wanda", "sparsegpt", "taylor")


def _previous(fresh: bool) -> list[dict]:
    path = RESULTS / "sparsity.json"
    return [] if fresh or not path.is_file() else json.loads(path.read_text())["rows"]


def _find(rows: list[dict], method: str, target: str, schedule: str, tokens: int | None = None) -> dict | None:
    return next((r for r in rows if (r["method"], r["target"], r["schedule"]) == (method, target, schedule)
                 and (tokens is None or r.get("distill_tokens") == tokens)), None)


def _add(rows: list[dict], row: dict) -> dict:
    rows.append(row)
    print(row, flush=True)
    return row


def _write(rows: list[dict], base: float, meta: dict) -> None:
    """The rows so far (each run rewrites the results, so an interrupted run keeps what it measured)."""
    for row in rows:
        row["increase"] = f"{row['perplexity'] / base - 1:+.1%}"
    table = markdown_table(rows, ["method", "target", "schedule", "sparsity", "perplexity", "increase",
                                  "distill_tokens", "seconds"])
    write_results("sparsity", rows, table, meta)


if __name__ == "__main__":
    main()
