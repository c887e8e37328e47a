"""Structured pruning on SmolLM2-135M-Instruct, no recovery training (``make bench-smollm2-prune``).

Protocol in ``smollm2_tier.py``. SmolLM2 has 9 query heads in 3 key/value groups
of 3 and hidden size 576; transformers' Llama config needs the kept head count
to divide 576, and grouped-query attention needs (kept groups) x (heads per
group): the valid kept counts are 3, 6 and 9, so "heads" here keeps 6 (one
whole key/value group removed, 33%). Rows: MLP 25% and 50%, heads keep 6, each
with activation, taylor and magnitude importance; 1 and 3 whole layers by
block influence. Each row is written to ``benchmarks/results/smollm2-prune.json``
when measured; rows already there are skipped.
"""

from __future__ import annotations

import argparse

from smollm2_tier import BASELINE_NOTE, Rows, Timer, machine, ppl, tier_setup

from common import torch

COLUMNS = ["method", "heads (q/kv)", "intermediate", "layers", "params_M", "params_%", "ppl", "increase_%",
           "prune_s", "loadavg_1m", "torch_threads", "notes"]


def settings() -> dict:
    from llmslim.recipe.steps import PruneConfig

    out = {}
    for importance in ("activation", "taylor", "magnitude"):
        out[f"mlp 25% {importance}"] = PruneConfig(mlp=0.25, importance=importance)
        out[f"mlp 50% {importance}"] = PruneConfig(mlp=0.5, importance=importance)
        out[f"heads 9->6 (1 of 3 kv groups) {importance}"] = PruneConfig(heads={"keep": 6}, importance=importance)
    out["depth -1 layer (block influence)"] = PruneConfig(layers=1)
    out["depth -3 layers (block influence)"] = PruneConfig(layers=3)
    return out


def describe(model, name: str, base: dict | None) -> dict:
    from llmslim.modeling import count_parameters

    cfg, params = model.config, count_parameters(model)
    return {"key": name, "method": name, "heads (q/kv)": f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}",
            "intermediate": cfg.intermediate_size, "layers": cfg.num_hidden_layers,
            "params_M": round(params / 1e6, 2),
            "params_%": round(100 * params / (base["params_M"] * 1e6 if base else params), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="remeasure every row")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching rows")
    args = parser.parse_args()
    folder, calib, eval_ids, ctx = tier_setup()

    from llmslim.modeling import load_model
    from llmslim.steps import run_step

    rows = Rows("prune", COLUMNS, args.fresh)
    base = rows.get("original")
    if base is None:
        model = load_model(str(folder), "float32", "cpu")
        base = rows.add({**describe(model, "original", None), "ppl": round(ppl(model, eval_ids), 3),
                         "increase_%": 0.0, **machine()})
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    for name, config in settings().items():
        if rows.get(name) or (wanted and not any(w in name for w in wanted)):
            continue
        model = load_model(str(folder), "float32", "cpu")
        env = machine()
        with Timer() as timer:
            outcome = run_step(model, config, ctx)
        value = ppl(model, eval_ids)
        rows.add({**describe(model, name, base), "ppl": round(value, 3),
                  "increase_%": round(100 * (value / base["ppl"] - 1), 1), "prune_s": round(timer.seconds, 1),
                  **env, "notes": "; ".join(outcome.changed.get("notes", [])),
                  "layers_removed": outcome.changed.get("layers_removed")})
    rows.save(f"{BASELINE_NOTE}. No recovery training. Calibration windows feed the activation/taylor scores and "
              "the block influence.")


if __name__ == "__main__":
    main()
