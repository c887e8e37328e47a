"""Recovery by distillation on SmolLM2-135M-Instruct (``make bench-smollm2-distill``).

Protocol in ``smollm2_tier.py``. Prunes MLP 25% (1536 -> 1152) and one of the
3 key/value groups (9 -> 6 query heads), activation importance, then recovers
with the same token budget (``--tokens``, from ``wikitext-2/valid.txt``, windows
of ``--seqlen``) by (a) forward KL (T = 2) from the original (dequantized)
model and (b) plain next-token cross-entropy. "recovered" is the share of the
perplexity lost by pruning that recovery won back. Rows are written to
``benchmarks/results/smollm2-distill.json`` as measured; rows already there are
skipped (the pruned model is recomputed, deterministically, when needed).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from smollm2_tier import BASELINE_NOTE, WIKITEXT, Rows, Timer, machine, ppl, tier_setup

from common import saved_size, torch

COLUMNS = ["method", "params_M", "ppl", "increase_%", "recovered_%", "tokens", "train_tok_s", "step_s",
           "loadavg_1m", "torch_threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536, help="training budget of each recovery run")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--losses", default="kl,ce")
    parser.add_argument("--fresh", action="store_true", help="remeasure every row")
    args = parser.parse_args()
    folder, calib, eval_ids, ctx = tier_setup()
    tokenizer = ctx.tokenizer

    from llmslim.modeling import count_parameters, load_model
    from llmslim.recipe.steps import DistillConfig, PruneConfig
    from llmslim.steps import run_step

    rows = Rows("distill", COLUMNS, args.fresh)
    base = rows.get("original")
    if base is None:
        model = load_model(str(folder), "float32", "cpu")
        base = rows.add({"key": "original", "method": "original", "params_M": round(count_parameters(model) / 1e6, 2),
                         "ppl": round(ppl(model, eval_ids), 3), "increase_%": 0.0, **machine()})
    with tempfile.TemporaryDirectory() as tmp:
        pruned_dir = Path(tmp) / "pruned"
        model = load_model(str(folder), "float32", "cpu")
        with Timer() as timer:
            run_step(model, PruneConfig(heads={"keep": 6}, mlp=0.25, importance="activation"), ctx)
        saved_size(model, tokenizer, pruned_dir)
        pruned = rows.get("pruned")
        if pruned is None:
            value = ppl(model, eval_ids)
            pruned = rows.add({"key": "pruned", "method": "pruned: heads 9->6 (1 of 3 kv groups), mlp 1536->1152",
                               "params_M": round(count_parameters(model) / 1e6, 2), "ppl": round(value, 3),
                               "increase_%": round(100 * (value / base["ppl"] - 1), 1),
                               "step_s": round(timer.seconds, 1), **machine()})
        for loss in [x.strip() for x in args.losses.split(",") if x.strip()]:
            key = f"distill-{loss}"
            if rows.get(key):
                continue
            config = DistillConfig(dataset=f"text:{WIKITEXT / 'valid.txt'}", eval_dataset=f"text:{WIKITEXT / 'test.txt'}",
                                   eval_windows=4, eval_every=0, tokens=args.tokens, seqlen=args.seqlen,
                                   batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
                                   loss=loss, temperature=2.0)
            student = load_model(str(pruned_dir), "float32", "cpu")
            env = machine()
            with Timer() as timer:
                changed = run_step(student, config, ctx).changed
            value = ppl(student, eval_ids)
            share = (pruned["ppl"] - value) / (pruned["ppl"] - base["ppl"])
            rows.add({"key": key, "method": f"pruned + distill {loss}" + (" (T=2)" if loss != "ce" else ""),
                      "params_M": pruned["params_M"], "ppl": round(value, 3),
                      "increase_%": round(100 * (value / base["ppl"] - 1), 1), "recovered_%": round(100 * share, 1),
                      "tokens": changed["tokens"], "train_tok_s": changed["tokens_per_s"],
                      "step_s": round(timer.seconds, 1), **env})
    rows.save(f"{BASELINE_NOTE}. Recovery: {args.tokens} tokens each from wikitext-2 valid.txt, batch "
              f"{args.batch_size} x {args.seqlen}, lr {args.lr}, AdamW, 5% warm-up + cosine; the teacher is the "
              "original (dequantized) model.")


if __name__ == "__main__":
    main()
