"""Does the memory plan hold? (``make bench-memory-plan``)

Runs a few recipes with ``llmslim run`` (each in a fresh process, so that each
starts from the same resident set) on the tiny demo model
(``llmslim/demo_model``) and on ``../shared/models/pydocs-llama-9m`` (skipped,
saying so, when absent), and compares every phase's estimate in the report's
``memory`` record with the peak the run measured there. On a CPU machine the
device is the host: the peaks are the process's RSS high-water mark, reset at
each phase. Besides the total (what a limit is checked against) the tables
give the part above the process's own resident set at planning time
(``host_base_bytes``: Python, torch, transformers), which on models this
small is most of the total; that part is what depends on the model and the
recipe. Writes benchmarks/results/memory_plan.md|json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import RESULTS, ROOT, SHARED, markdown_table

TOLERANCE = 0.25
CAVEAT = ("Not an out-of-sample check: the host constants of llmslim/memory_estimates.py (the tokenizer's "
          "bytes per character, the runtime overhead) were measured on this machine with these models and "
          "data. CPU only (device = host); the CUDA side of the plan is not measured here. Seconds are rough "
          "and not part of the check (the machine is shared).")
COLUMNS = ["model", "recipe", "phase", "mode", "est_MB", "meas_MB", "ratio", "est_above_base_MB",
           "meas_above_base_MB", "ratio_above_base", "est_s", "meas_s"]

STEPS = {
    "gptq-w4": "  - gptq: {bits: 4, group_size: 128}",
    "rtn-w4": "  - rtn: {bits: 4, group_size: 128}",
    "prune-mlp25": "  - prune: {mlp: 0.25}",
}


def recipe_text(name: str, model: Path, train: str, test: str, steps: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        version: 1
        name: {name}
        model: {model}
        dtype: float32
        device: cpu
        calibration: {{dataset: "{train}", samples: 64, seqlen: 256}}
        steps:
        STEPS
        evaluate:
          perplexity: {{dataset: "{test}", seqlen: 256, batch_size: 8, max_windows: 32}}
          latency: {{prompt_tokens: 32, new_tokens: 16, repeats: 2}}
        output: ./out/{name}
        {extra}""").replace("STEPS", steps)


def run_recipe(folder: Path, text: str, name: str) -> dict:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "llmslim", "run", str(path), "--quiet", "--json", "--force"],
                          capture_output=True, text=True, cwd=folder)
    if done.returncode not in (0, 3):
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def rows_of(model: str, recipe: str, report: dict) -> list[dict]:
    memory = report["memory"]
    base = memory.get("host_base_bytes") or 0
    rows = []
    for p in memory["phases"]:
        est, meas = p["estimated_device_bytes"], p["measured_device_bytes"]
        if meas is None:
            continue
        rows.append({"model": model, "recipe": recipe, "phase": p["phase"], "mode": p["mode"],
                     "est_MB": round(est / 1e6, 1), "meas_MB": round(meas / 1e6, 1), "ratio": round(est / meas, 3),
                     "est_above_base_MB": round((est - base) / 1e6, 1),
                     "meas_above_base_MB": round((meas - base) / 1e6, 1),
                     "ratio_above_base": round((est - base) / (meas - base), 3) if meas > base else None,
                     "est_s": p["estimated_seconds"], "meas_s": p["measured_seconds"]})
    return rows


def models() -> list[tuple[str, Path, str, str]]:
    found = [("demo (1.3M)", ROOT / "llmslim" / "demo_model", "builtin:stdlib-docs:train",
              "builtin:stdlib-docs:test")]
    shared_model, data = SHARED / "models" / "pydocs-llama-9m", SHARED / "data" / "pydocs"
    if shared_model.is_dir() and data.is_dir():
        found.append(("pydocs-llama-9m", shared_model, f"text:{data / 'train.txt'}", f"text:{data / 'test.txt'}"))
    else:
        print(f"skipping pydocs-llama-9m: {shared_model} or {data} not found")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--streamed", action="store_true", help="also run gptq-w4 with memory.mode: streamed")
    args = parser.parse_args()
    rows, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, model, train, test in models():
            plans = [(name, STEPS[name], "") for name in args.recipes]
            if args.streamed:
                plans.append(("gptq-w4-streamed", STEPS["gptq-w4"], "memory: {mode: streamed}"))
            for name, steps, extra in plans:
                report = run_recipe(folder, recipe_text(name, model, train, test, steps, extra), name)
                runs.append({"model": label, "recipe": name, "status": report["status"],
                             "host_base_bytes": report["memory"]["host_base_bytes"],
                             "host_measure": report["memory"]["host_measure"]})
                rows.extend(rows_of(label, name, report))
                print(markdown_table(rows[-4:], COLUMNS), flush=True)
    within = sum(abs(r["ratio"] - 1) <= TOLERANCE for r in rows)
    meta = {"phases": len(rows), f"within_{TOLERANCE:.0%}": within, "runs": runs,
            "note": "CPU run: device = host = process RSS (VmHWM reset per phase); ratio = estimate / measured"}
    table = markdown_table(rows, COLUMNS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_plan.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "memory_plan.md").write_text(
        f"# memory_plan\n\n{len(rows)} phases measured, {within} with the estimate within ±{TOLERANCE:.0%} of the "
        f"measured peak.\n\n{CAVEAT}\n\n{json.dumps(meta)}\n\n{table}\n")
    print(table)
    print(f"{within}/{len(rows)} phases within ±{TOLERANCE:.0%}")


if __name__ == "__main__":
    main()
