"""Rounds against one-shot on SmolLM2-135M-Instruct (``make bench-smollm2-schedule``).

Protocol in ``smollm2_tier.py``. wanda to 50% unstructured (every linear of
every decoder layer), recovered with one fixed total budget of KL (T = 2)
distillation from the original (dequantized) model on ``wikitext-2/valid.txt``
(windows of ``--seqlen``, batch ``--batch-size``, lr ``--lr``): (a) one-shot,
then one distillation of ``rounds x --round-tokens`` tokens; (b) ``--rounds``
rounds of a 1/rounds share of the target, each followed by ``--round-tokens``
tokens. Round checkpoints go to ``benchmarks/.cache/schedule/`` so an
interrupted row resumes; rows already in
``benchmarks/results/smollm2-schedule.json`` are skipped (``--fresh``
remeasures).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from smollm2_tier import BASELINE_NOTE, WIKITEXT, Rows, Timer, machine, ppl, tier_setup

from common import ROOT

COLUMNS = ["method", "target", "schedule", "sparsity", "ppl", "increase_%", "distill_tokens", "step_s",
           "loadavg_1m", "torch_threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-tokens", type=int, default=8192)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--fresh", action="store_true", help="remeasure every row")
    args = parser.parse_args()
    folder, calib, eval_ids, ctx = tier_setup()

    from llmslim.modeling import load_model
    from llmslim.recipe.steps import DistillConfig, SparsifyConfig
    from llmslim.steps import run_step

    rows = Rows("schedule", COLUMNS, args.fresh)
    base = rows.baseline("dense", folder, eval_ids, method="dense (dequantized Q4_1)", target="-", schedule="-")
    total = args.rounds * args.round_tokens
    plans = [("one-shot + distill", 1, total), (f"{args.rounds} rounds + distill each", args.rounds,
                                                 args.round_tokens)]
    for label, rounds, tokens in plans:
        key = f"wanda-{args.sparsity:g}-{rounds}x{tokens}"
        if rows.get(key):
            continue
        recover = DistillConfig(dataset=f"text:{WIKITEXT / 'valid.txt'}", eval_dataset=f"text:{WIKITEXT / 'test.txt'}",
                                eval_windows=4, eval_every=0, tokens=tokens, seqlen=args.seqlen,
                                batch_size=args.batch_size, micro_batch_size=4, lr=args.lr, loss="kl",
                                temperature=2.0)
        config = SparsifyConfig(method="wanda", sparsity=args.sparsity, rounds=rounds, recover=recover)
        scratch = ROOT / "benchmarks" / ".cache" / "schedule" / key
        model = load_model(str(folder), "float32", "cpu")
        env = machine()
        with Timer() as timer:
            outcome = run_step(model, config, replace(ctx, scratch=scratch))
        value = ppl(model, eval_ids)
        rows.add({"key": key, "method": "wanda", "target": f"{args.sparsity:.0%}", "schedule": label,
                  "sparsity": outcome.changed.get("sparsity"), "ppl": round(value, 3),
                  "increase_%": round(100 * (value / base["ppl"] - 1), 1), "distill_tokens": rounds * tokens,
                  "step_s": round(timer.seconds, 1), **env})
    rows.save(f"{BASELINE_NOTE}. Same total distillation budget in both schedules; KL (T=2) from the original "
              f"model, seqlen {args.seqlen}, batch {args.batch_size}, lr {args.lr}.")


if __name__ == "__main__":
    main()
