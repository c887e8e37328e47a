"""``llmslim search`` on the shared reference model (``make bench-search``).

A 12-trial grid on ``../shared/models/pydocs-llama-9m``: prune MLP fraction (0 = no prune step, 0.25,
0.5) x GPTQ bits (3, 4) x group size (32, 128), ranked by P^1.5 * T (decode time; this CPU has no
energy counter). Records the front, the search's total time, and what the trials cost run one by
one (every trial is also run alone as a plain ``llmslim run`` and timed; ``--no-standalone`` skips it). Writes
benchmarks/results/search.{md,json} and search-pareto.png. Small calibration and evaluation (the CPU
is shared). Skips (exit 0) when ../shared is absent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import RESULTS, Timer, markdown_table, shared_or_skip

RECIPE = """\
version: 1
name: pydocs-search
model: {model}
dtype: float32
device: cpu
seed: 0
calibration: {{dataset: text:{data}/train.txt, samples: {samples}, seqlen: 128}}
steps:
  - prune: {{mlp: 0.25}}
  - gptq: {{bits: 4, group_size: 128}}
evaluate:
  perplexity: {{dataset: text:{data}/test.txt, seqlen: 256, max_windows: {windows}}}
  latency: {{prompt_tokens: 32, new_tokens: 16, repeats: 3}}
  energy: true
budgets:
  max_perplexity_increase: 10%
output: {out}
search:
  grid:
    steps.0.prune.mlp: [0.0, 0.25, 0.5]
    steps.1.gptq.bits: [3, 4]
    steps.1.gptq.group_size: [32, 128]
  objective: {{perplexity_exponent: 1.5, time: decode, time_weight: 0.5, energy_weight: 0.5, energy: optional}}
  select: best
"""


def _standalone(recipe: Path, work: Path) -> float:
    """Every trial as its own `llmslim run` (fresh output, its own baseline and steps), timed."""
    from llmslim.pipeline import run_recipe
    from llmslim.search.plan import load_search

    total = 0.0
    for spec in load_search(recipe).trials:
        single = spec.recipe.model_copy(update={"output": str(work / f"standalone-{spec.index}")})
        with Timer() as t:
            run_recipe(single)
        total += t.seconds
        print(f"standalone trial {spec.index}: {t.seconds:.1f} s")
    return total


def _num(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _row(t: dict) -> dict:
    m, rel = t["metrics"] or {}, t["relative"]
    return {"trial": t["index"], "values": ", ".join(f"{k.split('.')[-1]}={v}" for k, v in t["overrides"].items()),
            "status": t["status"], "perplexity": _num(m.get("perplexity"), "{:.3f}"),
            "size MB": _num(m["size_bytes"] / 1e6 if m else None, "{:.2f}"), "P": _num(rel["perplexity"], "{:.4f}"),
            "T": _num(rel["time"], "{:.3f}"), "score": _num(t["score"], "{:.4f}"),
            "front": ("selected, " if t["selected"] else "") + ("yes" if t["pareto"] else ""),
            "shared steps": ",".join(map(str, t["shared_steps"])) or "-", "seconds": f"{t['wall_seconds']:.1f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 128 tokens")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 256 tokens")
    parser.add_argument("--no-standalone", action="store_true", help="skip running every trial alone")
    args = parser.parse_args()
    model_dir, data_dir = shared_or_skip("pydocs-llama-9m", "pydocs")
    from llmslim.search import run_search

    work = Path(tempfile.mkdtemp(prefix="llmslim-bench-search-"))
    recipe, out = work / "search.yaml", work / "out"
    recipe.write_text(RECIPE.format(model=model_dir, data=data_dir, samples=args.samples, windows=args.windows,
                                    out=out))
    with Timer() as total:
        outcome = run_search(recipe, announce=print)
    data = json.loads((out / "search.json").read_text())
    standalone = None if args.no_standalone else _standalone(recipe, work)
    rows = [_row(t) for t in data["trials"]]
    meta = {"model": "pydocs-llama-9m", "trials": len(rows), "search_seconds": round(total.seconds, 1),
            "standalone_seconds": round(standalone, 1) if standalone is not None else None,
            "steps_computed": data["steps_computed"], "steps_reused": data["steps_reused"],
            "exit_code": outcome.exit_code, "selected": data["selected"], "cpu": data["environment"]["cpu"],
            "torch_threads": data["environment"]["torch_threads"], "objective_note": data["objective_note"],
            "calibration_windows": args.samples, "eval_windows": args.windows}
    table = markdown_table(rows, list(rows[0]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    shutil.copyfile(out / "pareto.png", RESULTS / "search-pareto.png")
    text = f"# search\n\n{json.dumps(meta)}\n\n{table}\n\n![Pareto front](search-pareto.png)\n"
    (RESULTS / "search.md").write_text(text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
