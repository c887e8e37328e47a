"""Per-weight sparsity on SmolLM2-135M-Instruct, one shot (``make bench-smollm2-sparsity``).

Protocol in ``smollm2_tier.py``. Rows: 50% unstructured and 2:4 with magnitude,
wanda, sparsegpt and taylor, every linear of every decoder layer (embeddings
and the tied head dense), no recovery. Each row is written to
``benchmarks/results/smollm2-sparsity.json`` when measured; rows already there
are skipped (``--only`` picks rows by substring).
"""

from __future__ import annotations

import argparse

from smollm2_tier import BASELINE_NOTE, Rows, Timer, machine, ppl, tier_setup


COLUMNS = ["method", "target", "sparsity", "ppl", "increase_%", "loss_vs_magnitude", "sparsify_s", "loadavg_1m",
           "torch_threads"]
METHODS = ("magnitude", "wanda", "sparsegpt", "taylor")
TARGETS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="remeasure every row")
    parser.add_argument("--only", default="", help="comma-separated substrings of row keys (e.g. wanda-50%%)")
    args = parser.parse_args()
    folder, calib, eval_ids, ctx = tier_setup()

    from llmslim.modeling import load_model
    from llmslim.recipe.steps import SparsifyConfig
    from llmslim.steps import run_step

    rows = Rows("sparsity", COLUMNS, args.fresh)
    base = rows.baseline("dense", folder, eval_ids, method="dense (dequantized Q4_1)", target="-", sparsity=0.0)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    for label, target in TARGETS.items():
        for method in METHODS:
            key = f"{method}-{label}"
            if rows.get(key) or (wanted and not any(w in key for w in wanted)):
                continue
            model = load_model(str(folder), "float32", "cpu")
            env = machine()
            with Timer() as timer:
                outcome = run_step(model, SparsifyConfig(method=method, **target), ctx)
            value = ppl(model, eval_ids)
            rows.add({"key": key, "method": method, "target": label, "sparsity": outcome.changed["sparsity"],
                      "ppl": round(value, 3), "increase_%": round(100 * (value / base["ppl"] - 1), 1),
                      "sparsify_s": round(timer.seconds, 1), **env})
    for row in rows.rows:  # each method's loss as a share of magnitude's at the same target
        mag = rows.get(f"magnitude-{row.get('target')}")
        if mag and row.get("key") != "dense" and mag["ppl"] > base["ppl"]:
            row["loss_vs_magnitude"] = round((row["ppl"] - base["ppl"]) / (mag["ppl"] - base["ppl"]), 3)
    rows.save(f"{BASELINE_NOTE}. No recovery training. loss_vs_magnitude = (ppl - dense) / (magnitude's ppl - "
              "dense) at the same target: the issue expects wanda and sparsegpt at or below 0.5 at 50%.")


if __name__ == "__main__":
    main()
