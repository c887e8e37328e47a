"""Streamed compression of models larger than the host memory it is given (``make bench-scale``).

Protocol:

- models: randomly initialised ``LlamaForCausalLM`` checkpoints of about 0.5B, 1B and 3B
  parameters (``SIZES``: GQA, shapes of real models, vocab 32000, embeddings *untied*, rotary
  defaults of transformers), built once into ``benchmarks/.cache/scale/<size>/``: each tensor is
  drawn on its own (normal, std 0.02, seeded by its name; RMSNorm weights 1) in bfloat16 and
  handed to llmslim's ``ShardWriter`` (500 MB shards + model.safetensors.index.json), so the
  build never holds more than one shard; config.json and the demo model's tokenizer (vocab 2048:
  only the first 2048 embedding rows are ever used) beside them;
- data: the builtin ``stdlib-docs`` text written once into the cache as two small text files
  (the first ``CALIB_CHARS`` characters of the train split, the whole test split), so that
  tokenizing stays a small fixed cost;
- one recipe per row, run by ``llmslim run`` in a fresh subprocess: dtype bfloat16, device cpu,
  calibration 16 x 256 tokens, ``gptq: {bits: 4, group_size: 128}`` (row ``prune-gptq``:
  ``prune: {mlp: 0.25}`` first), perplexity on the first 4 windows of 256 tokens (batch 1), no
  latency, ``memory: {max_host_memory: min(0.35 x W + 1 GB, 0.9 x W)}`` (the default
  ``max_shard_size``: streamed steps spool the pending shard to disk)
  with W the bf16 weight bytes (the hidden ``tiny`` size, for development, forces
  ``mode: streamed`` instead: no limit can be below its weights);
- measured: the child's peak RSS over the whole run (``/proc/<pid>/status`` polled every
  ``POLL_S``, its VmHWM, VmRSS, RssAnon and RssFile, with ``wait4``'s ru_maxrss and the report's
  per-phase peaks; the largest of them), the report's per-phase mode, estimate, measured peak and
  seconds, perplexity before/after, the output's size, and whether the output loads (llmslim's
  ``load_model`` and one forward pass, in another subprocess, with its own peak RSS);
- checks: whole-run peak RSS <= 0.4 x W + 1 GB, and every phase's estimate within +-25% of its
  measured peak.

Rows are keyed ``<size>/<recipe>`` and saved after each run to benchmarks/results/scale.json|md;
rows already measured are skipped unless ``--fresh``; ``--only`` keeps rows whose key contains
the given text; ``--sizes 0.5b,1b,3b`` picks the models. Seconds are noisy (shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

from common import RESULTS, ROOT, markdown_table
from smollm2_tier import machine

CACHE = ROOT / "benchmarks" / ".cache" / "scale"
DEMO = ROOT / "llmslim" / "demo_model"
COMMON = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SIZES = {  # hidden, layers, intermediate, heads / kv heads
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "0.5b": {"hidden_size": 1280, "num_hidden_layers": 24, "intermediate_size": 3584, "num_attention_heads": 20,
             "num_key_value_heads": 4},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
           "num_key_value_heads": 8},  # Llama-3.2-1B's shapes, smaller vocab, untied
    "3b": {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192, "num_attention_heads": 24,
           "num_key_value_heads": 8},  # Llama-3.2-3B's shapes, smaller vocab, untied
}
DEFAULT_SIZES = "0.5b,1b,3b"
FORCED_STREAMED = {"tiny"}
RECIPES = {"gptq": "  - gptq: {bits: 4, group_size: 128}",
           "prune-gptq": "  - prune: {mlp: 0.25}\n  - gptq: {bits: 4, group_size: 128}"}
BUILD_SHARD = 500 * 10**6
CALIB_SAMPLES, CALIB_SEQLEN, EVAL_WINDOWS, EVAL_SEQLEN = 16, 256, 4, 256
CALIB_CHARS = 200_000
LIMIT_SHARE, LIMIT_EXTRA, LIMIT_CAP = 0.35, 10**9, 0.9    # max_host_memory = min(0.35 W + 1 GB, 0.9 W)
BOUND_SHARE, BOUND_EXTRA, TOLERANCE = 0.4, 10**9, 0.25    # the checks
POLL_S = 0.02
GB = 1e9
COLUMNS = ["key", "params_M", "bf16_GB", "limit_GB", "peak_rss_GB", "bound_GB", "rss_ok", "peak_anon_GB",
           "peak_file_GB", "peak_device_GB", "est_peak_GB", "est_ok", "worst_ratio", "total_s", "est_total_s",
           "s_per_Bparam", "ppl_before", "ppl_after", "out_GB", "loads", "load_rss_GB", "status"]
PHASE_COLUMNS = ["key", "phase", "mode", "est_MB", "meas_MB", "ratio", "est_s", "meas_s"]


# --- building the models -----------------------------------------------------------------------------


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process (bytes); empty once it has gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _random_tensor(key: str, shape, torch):
    if "norm" in key:
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)


def build(size: str) -> Path:
    """The random-init checkpoint of ``size`` in the cache, built once (one tensor at a time)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmslim.shards import ShardWriter

    folder = CACHE / size
    if (folder / "build.json").is_file():
        return folder
    partial = CACHE / f"{size}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    ids = {k: tokenizer.eos_token_id for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlamaConfig(**COMMON, **SIZES[size], **ids)
    _reset_hwm()
    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = weight_bytes = 0
    with ShardWriter(partial, BUILD_SHARD) as writer:
        for key, meta in model.state_dict().items():
            writer.add({key: _random_tensor(key, meta.shape, torch)})
            params += meta.numel()
            weight_bytes += meta.numel() * 2
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    facts = {"size": size, "config": {**COMMON, **SIZES[size]}, "parameters": params, "bf16_bytes": weight_bytes,
             "seconds": round(time.perf_counter() - start, 1), "build_peak_rss_bytes": _status().get("VmHWM")}
    (partial / "build.json").write_text(json.dumps(facts, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    print(f"built {folder}: {params / 1e6:.0f}M parameters, {weight_bytes / GB:.2f} GB, "
          f"{facts['seconds']} s, build peak RSS {(facts['build_peak_rss_bytes'] or 0) / GB:.2f} GB", flush=True)
    return folder


def data_files() -> tuple[Path, Path]:
    """(calibration text, evaluation text) from the builtin stdlib-docs splits, written once."""
    from llmslim.builtin_data import load_builtin

    folder = CACHE / "data"
    calib, test = folder / "calib.txt", folder / "test.txt"
    if not (calib.is_file() and test.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        calib.write_text("\n\n".join(load_builtin("stdlib-docs:train"))[:CALIB_CHARS] + "\n", encoding="utf-8")
        test.write_text("\n\n".join(load_builtin("stdlib-docs:test")) + "\n", encoding="utf-8")
    return calib, test


def prepare_cache() -> None:
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    ignore = CACHE.parent / ".gitignore"  # as smollm2.py: nothing in benchmarks/.cache is tracked
    if not ignore.is_file():
        ignore.write_text("*\n")


# --- running -------------------------------------------------------------------------------------------


def watch(cmd: list[str], cwd: Path, stdout: Path, stderr: Path) -> tuple[int, float, dict]:
    """Run ``cmd`` and poll its /proc status; (exit code, seconds, peak bytes of each counter)."""
    peaks = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for name, value in _status(proc.pid).items():
                peaks[name] = max(peaks[name], value)
            time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peaks["ru_maxrss"] = usage.ru_maxrss * 1024
    return proc.returncode, time.perf_counter() - start, peaks


def host_limit(size: str, weight_bytes: int) -> int:
    return int(min(LIMIT_SHARE * weight_bytes + LIMIT_EXTRA, LIMIT_CAP * weight_bytes))


def recipe_text(name: str, size: str, model: Path, steps: str, limit: int, out: Path) -> str:
    calib, test = data_files()
    mode = "streamed" if size in FORCED_STREAMED else "auto"
    return textwrap.dedent(f"""\
        version: 1
        name: {name}
        model: {model}
        dtype: bfloat16
        device: cpu
        seed: 0
        calibration: {{dataset: "text:{calib}", samples: {CALIB_SAMPLES}, seqlen: {CALIB_SEQLEN}}}
        steps:
        STEPS
        evaluate:
          perplexity: {{dataset: "text:{test}", seqlen: {EVAL_SEQLEN}, batch_size: 1, max_windows: {EVAL_WINDOWS}}}
          energy: false
        memory: {{max_host_memory: {limit}, mode: {mode}}}
        output: {out}
        """).replace("STEPS", steps)


LOAD_CHECK = """
import json, sys, time, torch
from llmslim.modeling import load_model
start = time.perf_counter()
model = load_model(sys.argv[1], "bfloat16", "cpu")
with torch.no_grad():
    logits = model(torch.arange(32).unsqueeze(0)).logits
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "finite": bool(torch.isfinite(logits).all()),
                  "packed_linears": sum(hasattr(m, "qweight") for m in model.modules())}))
"""


def load_check(out: Path, folder: Path) -> dict:
    """Whether the output loads with llmslim's loader and gives finite logits; its peak RSS."""
    rc, seconds, peaks = watch([sys.executable, "-c", LOAD_CHECK, str(out)], folder, folder / "load.out",
                               folder / "load.err")
    result = {"rc": rc, "peak_rss_bytes": max(peaks.values())}
    if rc == 0:
        result.update(json.loads((folder / "load.out").read_text().strip().splitlines()[-1]))
    else:
        result["error"] = (folder / "load.err").read_text()[-1500:]
    return result


def phases_of(report: dict) -> list[dict]:
    rows = []
    for p in (report.get("memory") or {}).get("phases", []):
        est, meas = p["estimated_host_bytes"], p["measured_host_bytes"]
        rows.append({"phase": p["phase"], "mode": p["mode"], "est_bytes": est, "meas_bytes": meas,
                     "est_device_bytes": p["estimated_device_bytes"], "meas_device_bytes": p["measured_device_bytes"],
                     "ratio": round(est / meas, 3) if meas else None, "est_s": p["estimated_seconds"],
                     "meas_s": p["measured_seconds"], "reason": p["reason"]})
    return rows


def run_row(size: str, recipe: str, model: Path) -> dict:
    """One ``llmslim run`` of ``recipe`` on ``size``, measured from outside, and its output's load check."""
    facts = json.loads((model / "build.json").read_text())
    weights = facts["bf16_bytes"]
    folder = CACHE / "runs" / f"{size}-{recipe}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    limit, out = host_limit(size, weights), folder / "out"
    path = folder / "recipe.yaml"
    path.write_text(recipe_text(f"scale-{size}-{recipe}", size, model, RECIPES[recipe], limit, out))
    row = {"key": f"{size}/{recipe}", "size": size, "recipe": recipe, "machine": machine(),
           "parameters": facts["parameters"], "bf16_bytes": weights, "host_limit_bytes": limit,
           "bound_bytes": int(BOUND_SHARE * weights + BOUND_EXTRA)}
    cmd = [sys.executable, "-m", "llmslim", "run", str(path), "--quiet", "--json", "--force"]
    rc, seconds, peaks = watch(cmd, folder, folder / "report.out", folder / "run.err")
    row.update(rc=rc, total_s=round(seconds, 1), outside_peaks=peaks)
    try:
        report = json.loads((folder / "report.out").read_text())
    except ValueError:
        report = {}
    if not report:
        row["status"] = "refused" if rc == 2 else f"failed (rc {rc})"
        row["error"] = (folder / "run.err").read_text()[-1500:]
        return row
    row.update(summarise(report, peaks))
    if report["status"] != "failed":
        row["load"] = load_check(out, folder)
    shutil.rmtree(folder / ".out.work", ignore_errors=True)  # the step checkpoints: out/ has the result
    return row


def summarise(report: dict, peaks: dict) -> dict:
    phases = phases_of(report)
    measured = [p["meas_bytes"] for p in phases if p["meas_bytes"]]
    base, result = report.get("baseline") or {}, report.get("result") or {}
    return {"status": report["status"], "error": report.get("error"), "phases": phases,
            "peak_rss_bytes": max([peaks["VmHWM"], peaks["VmRSS"], peaks["ru_maxrss"], *measured]),
            "report_wall_s": report["wall_seconds"], "torch_threads": report["environment"].get("torch_threads"),
            "ppl_before": base.get("perplexity"), "ppl_after": result.get("perplexity"),
            "out_bytes": result.get("size_bytes"), "host_base_bytes": report["memory"]["host_base_bytes"]}


# --- results ---------------------------------------------------------------------------------------------


class Rows:
    """Rows keyed ``<size>/<recipe>``, saved to scale.json|md after every row."""

    def __init__(self, fresh: bool):
        self.path, self.fresh = RESULTS / "scale.json", fresh
        self.rows: list[dict] = json.loads(self.path.read_text())["rows"] if self.path.is_file() else []

    def done(self, key: str) -> bool:
        """Measured already (a refused or failed row is tried again); never with --fresh."""
        row = next((r for r in self.rows if r["key"] == key), None)
        return not self.fresh and row is not None and row.get("status") in ("passed", "budget_failed")

    def add(self, row: dict) -> None:
        """Merge ``row`` into the file as it is now (another size may be measured by another process)."""
        if self.path.is_file():
            self.rows = json.loads(self.path.read_text())["rows"]
        self.rows = [r for r in self.rows if r["key"] != row["key"]] + [row]
        self.save()

    def save(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        order = list(SIZES)
        self.rows.sort(key=lambda r: (order.index(r["size"]) if r["size"] in order else len(order), r["recipe"]))
        meta = {"protocol": __doc__.split("Protocol:", 1)[1].split("Rows are keyed")[0].strip(),
                "machine_now": machine()}
        self.path.write_text(json.dumps({"meta": meta, "rows": self.rows}, indent=2) + "\n")
        table = markdown_table([flat(r) for r in self.rows], COLUMNS)
        phases = markdown_table([p for r in self.rows for p in phase_cells(r)], PHASE_COLUMNS)
        machines = "\n".join(f"- {r['key']}: {json.dumps(r['machine'])}, llmslim torch threads "
                             f"{r.get('torch_threads')}" for r in self.rows)
        (RESULTS / "scale.md").write_text(
            f"# scale\n\nProtocol (benchmarks/scale.py):\n\n{meta['protocol']}\n\n## Runs\n\n{table}\n\n"
            f"## Phases (host bytes; ratio = estimate / measured)\n\n{phases}\n\n## Machine at each row\n\n"
            f"{machines}\n\nNow: {json.dumps(meta['machine_now'])}\n")


def _gb(n) -> float | None:
    return None if n is None else round(n / GB, 3)


def flat(r: dict) -> dict:
    phases = r.get("phases", [])
    ratios = [p["ratio"] for p in phases if p["ratio"] is not None]
    load = r.get("load") or {}
    peak = r.get("peak_rss_bytes")
    ppl = lambda v: None if v is None else round(v, 1)  # noqa: E731
    return {"key": r["key"], "params_M": round(r["parameters"] / 1e6), "bf16_GB": _gb(r["bf16_bytes"]),
            "limit_GB": _gb(r["host_limit_bytes"]), "peak_rss_GB": _gb(peak), "bound_GB": _gb(r["bound_bytes"]),
            "rss_ok": None if peak is None else peak <= r["bound_bytes"],
            "peak_anon_GB": _gb(r["outside_peaks"]["RssAnon"]), "peak_file_GB": _gb(r["outside_peaks"]["RssFile"]),
            "peak_device_GB": _gb(max((p.get("meas_device_bytes") or 0 for p in phases), default=None)),
            "est_peak_GB": _gb(max((p["est_bytes"] for p in phases), default=None)),
            "est_total_s": round(sum(p["est_s"] or 0 for p in phases)) if phases else None,
            "est_ok": all(abs(x - 1) <= TOLERANCE for x in ratios) if ratios else None,
            "worst_ratio": max(ratios, key=lambda x: abs(x - 1)) if ratios else None, "total_s": r["total_s"],
            "s_per_Bparam": round(r["total_s"] / (r["parameters"] / 1e9)), "ppl_before": ppl(r.get("ppl_before")),
            "ppl_after": ppl(r.get("ppl_after")), "out_GB": _gb(r.get("out_bytes")),
            "loads": load.get("rc") == 0 and load.get("finite") is True if load else None,
            "load_rss_GB": _gb(load.get("peak_rss_bytes")), "status": r["status"]}


def phase_cells(r: dict) -> list[dict]:
    return [{"key": r["key"], "phase": p["phase"], "mode": p["mode"], "est_MB": round(p["est_bytes"] / 1e6),
             "meas_MB": None if p["meas_bytes"] is None else round(p["meas_bytes"] / 1e6), "ratio": p["ratio"],
             "est_s": p["est_s"], "meas_s": p["meas_s"]} for p in r.get("phases", [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated, of {DEFAULT_SIZES}")
    parser.add_argument("--only", default="", help="only rows whose key (<size>/<recipe>) contains this")
    parser.add_argument("--fresh", action="store_true", help="measure every selected row again")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}; known: {DEFAULT_SIZES}")
    prepare_cache()
    rows = Rows(args.fresh)
    for size in sizes:
        keys = [f"{size}/{recipe}" for recipe in RECIPES if args.only in f"{size}/{recipe}"]
        todo = [k for k in keys if not rows.done(k)]
        for key in sorted(set(keys) - set(todo)):
            print(f"{key}: already measured (--fresh to measure again)")
        if not todo:
            continue
        model = build(size)
        for key in todo:
            print(f"{key}: running", flush=True)
            row = run_row(size, key.split("/", 1)[1], model)
            rows.add(row)
            print(markdown_table([flat(row)], COLUMNS), flush=True)
    rows.save()
    print(f"wrote {RESULTS / 'scale.md'}")


if __name__ == "__main__":
    main()
