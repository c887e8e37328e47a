"""The evaluate phase of a finished ``scale.py`` row, streamed, alone in this process.

``python scale_evaluate.py 3b-prune-gptq``: the packed output of
``benchmarks/.cache/scale/runs/<row>/out`` measured as a streamed plan measures it (perplexity layer by
layer on the row's recipe windows, llmslim's :func:`~llmslim.evaluate.streamed.evaluate_streamed`), with
this process's RSS high-water mark; appended to ``benchmarks/results/scale-evaluate.json``. For a row
whose run evaluated resident, it shows what the streamed phase costs without rerunning the steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, ROOT, torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", help="a run folder name under benchmarks/.cache/scale/runs, e.g. 3b-prune-gptq")
    args = parser.parse_args()
    from llmslim.evaluate import prepare_eval_windows
    from llmslim.evaluate.streamed import evaluate_streamed
    from llmslim.modeling import load_tokenizer, weights_size_bytes
    from llmslim.recipe import load_recipe
    from llmslim.streaming import LazyModel

    torch.set_num_threads(1)
    run = ROOT / "benchmarks" / ".cache" / "scale" / "runs" / args.row
    recipe, out = load_recipe(run / "recipe.yaml"), run / "out"
    windows = prepare_eval_windows(recipe.evaluate, load_tokenizer(str(out)))
    metrics = evaluate_streamed(LazyModel(out, recipe.dtype), recipe.evaluate, size_bytes=weights_size_bytes(out),
                                windows=windows, device=torch.device("cpu"), reason="streamed by this script")
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    report = json.loads((run / "report.out").read_text())
    report = report[0] if isinstance(report, list) else report
    row = {"row": args.row, "perplexity_streamed": metrics.perplexity,
           "perplexity_in_run": report["result"]["perplexity"], "process_peak_rss_bytes": hwm,
           "run_phases": {p["phase"]: {"mode": p["mode"], "measured_host_bytes": p.get("measured_host_bytes")}
                          for p in report["memory"]["phases"]}}
    path = RESULTS / "scale-evaluate.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps([r for r in rows if r["row"] != args.row] + [row], indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
