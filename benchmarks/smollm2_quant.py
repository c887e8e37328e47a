"""GPTQ vs RTN, and GPTQModel side by side, on SmolLM2-135M-Instruct (``make bench-smollm2-quant``).

Protocol in ``smollm2_tier.py``. Rows, in priority order (each written to
``benchmarks/results/smollm2-quant.json`` as soon as it is measured; rows already
there are skipped):

1. the baseline, then llmslim's RTN and GPTQ with default options at W4 g128,
   W3 g128, W2 g128 and W3 per-channel, with quantization wall time; with
   ``--methods``, also ``awq`` (packed, searched clipping), ``awq+gptq`` (AWQ's
   scales, no clipping, then GPTQ), ``awq-rgptq`` (one awq step with ``rounding:
   gptq``: scales chosen by GPTQ's error), ``signround`` (learned rounding,
   packed) and ``signround-gptq`` (learned rounding started from GPTQ,
   ``--signround-target``, ``--signround-lr``); a setting ``BITS:GROUP:asym``
   uses asymmetric grids; the awq and signround checkpoints are kept for the
   interop check;
2. with ``--peer-python`` (a venv with gptqmodel + optimum, see
   ``../shared/notes/peers-cpu.md``): GPTQModel at W4 g128 and W3 g128 on the
   same calibration windows, its wall time, its checkpoint evaluated through
   llmslim's loader and evaluation (the same path as llmslim's rows); and the
   interop check: llmslim's W4 g128 checkpoint loaded in stock transformers
   (gptqmodel ``gptq_torch`` backend: 576 is not a multiple of 128, so the last
   group is partial) against llmslim's own loader, on ``--interop-windows``
   windows, and the same for every kept awq / signround checkpoint.

3. with ``--kernels``: every kept checkpoint (and the W4 g128 gptq one) loaded by
   llmslim in bfloat16, where 2-, 3- and 4-bit layers run through the CPU int4
   kernel: which kernels ran, and perplexity on ``--interop-windows`` windows
   against the exact fp32 path on the same windows.

``--redo KEY,...`` remeasures the named rows (e.g. a peer row, to have it
measured in the same run as a new llmslim row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from smollm2_tier import BASELINE_NOTE, CALIB_SAMPLES, CALIB_SEQLEN, Rows, Timer, machine, ppl, tier_setup

from common import saved_size, torch

COLUMNS = ["method", "bits", "group", "calibration", "ppl", "increase_%", "size_MB", "quant_s", "eval_path",
           "loadavg_1m", "torch_threads"]
HERE = Path(__file__).resolve().parent
KEEP = HERE / ".cache" / "smollm2-tier"
KEPT = ("awq", "signround")   # checkpoints kept (with gptq W4 g128) for the interop check


def quantize_row(folder, ctx, configs: list, eval_ids, base_ppl, tmp: Path, key: str, label: str) -> dict:
    """Run ``configs`` (one step, or e.g. awq then gptq) on a fresh copy of the model and measure it; the
    W4 g128 gptq checkpoint and the awq / signround ones are kept under ``KEEP / key``."""
    from llmslim.modeling import load_model
    from llmslim.steps import run_step

    model = load_model(str(folder), "float32", "cpu")
    env = machine()
    with Timer() as timer:
        for config in configs:
            changed = run_step(model, config, ctx).changed
    value = ppl(model, eval_ids)
    errors = {f"layer_{k}": changed[k] for k in ("relative_output_error_mean", "gptq_relative_output_error_mean")
              if k in changed}   # awq: the mean per-linear output error, and plain GPTQ's on the same inputs
    last = configs[-1]
    names = [c.STEP_NAME for c in configs]
    keep = (names == ["gptq"] and (last.bits, last.group_size) == (4, 128)) or names[0] in KEPT
    size = saved_size(model, ctx.tokenizer, (KEEP if keep else tmp) / key)
    return {"method": f"llmslim {label}", "bits": last.bits, "group": last.group_size,
            "ppl": round(value, 3), "increase_%": round(100 * (value / base_ppl - 1), 2),
            "size_MB": round(size / 1e6, 1), "quant_s": round(timer.seconds, 1), "eval_path": "llmslim", **errors,
            **env}


def method_configs(method: str, bits: int, group: int, sym: bool, args) -> list:
    """The step configs of one part-1 method: rtn, gptq, awq (format gptq), awq+gptq (AWQ's scales without
    clipping, then GPTQ), awq-rgptq (rounding gptq, one pass), signround (packed;
    ``--signround-iters``/``--signround-batch``), signround-gptq (started from GPTQ; also
    ``--signround-target``/``--signround-lr``)."""
    from llmslim.recipe.awq_config import AwqConfig
    from llmslim.recipe.signround_config import SignroundConfig
    from llmslim.recipe.steps import GptqConfig, RtnConfig

    common = {"bits": bits, "group_size": group, "sym": sym}
    learned = dict(format="gptq", iters=args.signround_iters, batch_size=args.signround_batch)
    return {"rtn": lambda: [RtnConfig(**common)], "gptq": lambda: [GptqConfig(**common)],
            "awq": lambda: [AwqConfig(**common, format="gptq")],
            "awq+gptq": lambda: [AwqConfig(**common, clip=False), GptqConfig(**common)],
            "awq-rgptq": lambda: [AwqConfig(**common, rounding="gptq")],
            "signround": lambda: [SignroundConfig(**common, **learned)],
            "signround-gptq": lambda: [SignroundConfig(**common, **learned, start="gptq", target=args.signround_target,
                                                       lr=args.signround_lr)]}[method]()


def split_grid(setting: str) -> tuple[list[int], bool]:
    """``"3:128:asym"`` -> ``([3, 128], False)``: the numbers of a setting, and whether its grid is symmetric."""
    parts = setting.strip().split(":")
    sym = parts[-1] != "asym"
    return [int(p) for p in (parts if sym else parts[:-1])], sym


def method_key(method: str, bits: int, group: int, sym: bool, args) -> tuple[str, str]:
    """(row key, calibration label suffix) of one part-1 row."""
    suffix = f"-i{args.signround_iters}-b{args.signround_batch}" if method.startswith("signround") else ""
    if method == "signround-gptq":
        suffix += f"-{args.signround_target}" + (f"-lr{args.signround_lr:g}" if args.signround_lr else "")
    grid = "" if sym else "-asym"
    tag = args.tag if method != "rtn" else ""
    return f"{method.replace('+', '-')}-w{bits}-g{group}{grid}{suffix}{tag}", suffix.replace("-", " ")


def peer(python: str, *args) -> None:
    # gptqmodel 7.7.0 on a 2-core machine derives 1 CPU worker and then refuses its own loader pool of 2
    # ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1")
    env = {"GPTQMODEL_CPU_WORKERS": "2", **os.environ}
    subprocess.run([python, str(HERE / "peer_gptqmodel.py"), *map(str, args)], check=True, env=env)


def peer_rows(rows: Rows, folder, ctx, calib, eval_ids, base_ppl, args, tmp: Path) -> None:
    from llmslim.modeling import load_model
    from llmslim.recipe.steps import GptqConfig
    from llmslim.steps import run_step

    torch.save(calib, tmp / "calib.pt")
    torch.save(eval_ids[:0], tmp / "none.pt")  # GPTQModel's own (fp16) evaluation is skipped: too slow here
    for setting in [b for b in args.peer_bits.split(",") if b.strip()]:
        (bits,), sym = split_grid(setting)
        key = f"gptqmodel-w{bits}-g128" + ("" if sym else "-asym") + args.tag
        if rows.get(key):
            continue
        env = machine()
        peer(args.peer_python, "quantize", folder, tmp / "calib.pt", tmp / "none.pt", bits, 128, tmp / f"{key}.json",
             "sym" if sym else "asym")
        theirs = json.loads((tmp / f"{key}.json").read_text())
        ckpt = tmp / f"{key}.json.ckpt"
        value = ppl(load_model(str(ckpt), "float32", "cpu"), eval_ids)
        size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        label = "GPTQModel 7.7.0 gptq" + ("" if sym else " (asym)")
        rows.add({"key": key, "method": label, "bits": bits, "group": 128, "ppl": round(value, 3),
                  "increase_%": round(100 * (value / base_ppl - 1), 2), "size_MB": round(size / 1e6, 1),
                  "quant_s": round(theirs["quantize_seconds"], 1), "eval_path": "llmslim (its checkpoint)",
                  "calibration": f"{calib.shape[0]} x {calib.shape[1]}", **env})
    gptq_w4 = KEEP / "gptq-w4-g128"  # part 1 keeps its W4 g128 checkpoint here (git-ignored cache)
    if not (gptq_w4 / "config.json").is_file():
        model = load_model(str(folder), "float32", "cpu")
        run_step(model, GptqConfig(bits=4, group_size=128), ctx)
        saved_size(model, ctx.tokenizer, gptq_w4)
    few = eval_ids[: args.interop_windows]
    torch.save(few, tmp / "few.pt")
    kept = [("interop-w4-g128", gptq_w4, "llmslim W4 g128", 4)]
    for ckpt in sorted(p for p in KEEP.iterdir() if p.name.startswith(KEPT) and (p / "config.json").is_file()):
        bits = json.loads((ckpt / "config.json").read_text())["quantization_config"]["bits"]
        kept.append((f"interop-{ckpt.name}", ckpt, f"llmslim {ckpt.name}", bits))
    for key, ckpt, label, bits in kept:
        if not rows.get(key):
            rows.add(interop_row(key, ckpt, label, bits, few, args, tmp))


def kernel_rows(rows: Rows, eval_ids, args) -> None:
    """Part 3: the kept checkpoints through llmslim's bf16 kernels against its exact fp32 path."""
    from llmslim.modeling import load_model
    from llmslim.quant.qlinear import QuantLinear

    few = eval_ids[: args.interop_windows]
    for ckpt in sorted(p for p in KEEP.iterdir() if (p / "config.json").is_file()):
        key = f"kernels-{ckpt.name}"
        if rows.get(key):
            continue
        bits = json.loads((ckpt / "config.json").read_text())["quantization_config"]["bits"]
        exact = ppl(load_model(str(ckpt), "float32", "cpu"), few)
        model = load_model(str(ckpt), "bfloat16", "cpu")
        value = ppl(model, few)
        kernels = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
        rows.add({"key": key, "method": f"kernels: llmslim {ckpt.name} in bf16", "bits": bits, "ppl": round(value, 3),
                  "eval_path": f"llmslim bf16, kernels {kernels}, first {len(few)} windows; exact fp32 path on the "
                               f"same windows: {exact:.3f}", **machine()})


def interop_row(key: str, ckpt: Path, label: str, bits: int, few, args, tmp: Path) -> dict:
    """``ckpt`` loaded in stock transformers (gptqmodel's torch kernel) against llmslim's own loader."""
    from llmslim.modeling import load_model

    own = load_model(str(ckpt), "float32", "cpu")
    with torch.no_grad():
        own_logits = own(input_ids=few[:2]).logits.float()
    own_ppl = ppl(own, few)
    peer(args.peer_python, "load", ckpt, tmp / "few.pt", tmp / "load.json", "gptq_torch")
    loaded = json.loads((tmp / "load.json").read_text())
    diff = (torch.load(tmp / "load.json.logits.pt") - own_logits).abs().max().item()
    return {"key": key, "method": f"interop: {label} in stock transformers", "bits": bits, "group": 128,
            "ppl": round(loaded["perplexity"], 3), "eval_path": f"transformers + gptqmodel {loaded['kernels']} "
            f"fp16, first {few.shape[0]} windows; llmslim loader fp32 on the same windows: {own_ppl:.3f}; "
            f"max |logit diff| {diff:.3f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default="", help="python of a venv with gptqmodel and optimum")
    parser.add_argument("--interop-windows", type=int, default=4)
    parser.add_argument("--fresh", action="store_true", help="remeasure every row")
    parser.add_argument("--redo", default="", help="keys of rows to remeasure, comma-separated")
    parser.add_argument("--only-peer", action="store_true", help="skip part 1 (llmslim rows)")
    parser.add_argument("--kernels", action="store_true", help="part 3: the kept checkpoints through the bf16 kernels")
    parser.add_argument("--methods", default="rtn,gptq",
                        help="part 1 methods, comma-separated: rtn, gptq, awq, awq+gptq, awq-rgptq, signround, "
                             "signround-gptq")
    parser.add_argument("--signround-iters", type=int, default=200)
    parser.add_argument("--signround-batch", type=int, default=8)
    parser.add_argument("--signround-target", default="layer", choices=["layer", "model"])
    parser.add_argument("--signround-lr", type=float, default=None, help="default 1/iters")
    parser.add_argument("--settings", default="4:128,3:128,2:128,3:-1",
                        help="part 1 BITS:GROUP[:asym], comma-separated")
    parser.add_argument("--peer-bits", default="4,3",
                        help="GPTQModel bit widths (g128), comma-separated, each BITS[:asym]")
    parser.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES,
                        help="calibration windows (fewer than 128: rows keyed and labelled with it)")
    args = parser.parse_args()
    folder, calib, eval_ids, ctx = tier_setup(args.calib_samples)

    tag = "" if args.calib_samples == CALIB_SAMPLES else f"-c{args.calib_samples}"
    calib_label = f"{args.calib_samples} x {CALIB_SEQLEN}"
    rows = Rows("quant", COLUMNS, args.fresh)
    for key in filter(None, (k.strip() for k in args.redo.split(","))):
        rows.drop(key)
    base = rows.baseline("baseline", folder, eval_ids, method="baseline (dequantized Q4_1, fp32)", bits=32,
                         group="-", size_MB=round((folder / "model.safetensors").stat().st_size / 1e6, 1),
                         eval_path="llmslim")
    base_ppl = base["ppl"]
    with tempfile.TemporaryDirectory() as tmp:
        settings = [split_grid(s) for s in args.settings.split(",") if s.strip()]
        args.tag = tag
        for (bits, group), sym in [] if args.only_peer else settings:
            for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
                configs = method_configs(method, bits, group, sym, args)
                key, suffix = method_key(method, bits, group, sym, args)
                if not rows.get(key):
                    label = ("awq rounding=gptq" if method == "awq-rgptq" else
                             "signround start=gptq" if method == "signround-gptq" else method)
                    label += "" if sym else " (asym)"
                    row = quantize_row(folder, ctx, configs, eval_ids, base_ppl, Path(tmp), key, label)
                    label = "-" if method == "rtn" else calib_label
                    rows.add({"key": key, **row, "calibration": label + suffix})
        if args.peer_python and Path(args.peer_python).exists():
            peer_rows(rows, folder, ctx, calib, eval_ids, base_ppl, args, Path(tmp))
        else:
            print("no --peer-python with gptqmodel: GPTQModel rows and the interop check skipped")
    if args.kernels:
        kernel_rows(rows, eval_ids, args)
    rows.save(f"{BASELINE_NOTE}. llmslim rows: default options unless the method says otherwise (GPTQ act_order "
              "+ static groups + mse scale search, damp 0.01; RTN minmax), packed GPTQ format, evaluated on the "
              "exact fp32 dequant path.")


if __name__ == "__main__":
    main()
