"""Recovery of a pruned model by distillation (``make bench-distill``).

On ``../shared/models/pydocs-llama-9m`` and ``../shared/data/pydocs``: prune
25% of the attention heads and 25% of the MLP channels (activation importance,
``--samples`` calibration windows of train.txt), then recover with the same
token budget by (a) forward KL (T = 2) from the original model and (b) plain
next-token cross-entropy without a teacher; then the chain prune -> distill
(kl) -> GPTQ 4-bit g128 against the original: size on disk, perplexity,
decode tokens/s. Perplexity is measured on the first ``--eval-windows``
windows of test.txt (seqlen 256); "recovered" is the share of the
perplexity lost by pruning that the recovery won back. Writes
benchmarks/results/distill.{md,json}, the curves to distill-curves.json (and
distill.png with matplotlib).
Skips (exit 0) when ../shared is absent; without the prune step the
recovery runs are skipped too.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from common import (RESULTS, Timer, decode_speed, load_model, load_tokenizer, load_windows, markdown_table, perplexity,
                    saved_size, shared_or_skip, torch, write_results)

from llmslim.distill.records import plot_curves
from llmslim.modeling import count_parameters
from llmslim.progress import Progress
from llmslim.recipe.steps import STEP_CONFIGS, DistillConfig, GptqConfig
from llmslim.steps import StepContext, run_step


def _row(name: str, model, ppl: float, tokenizer, folder: Path, args, **extra) -> dict:
    row = {"model": name, "params_M": round(count_parameters(model) / 1e6, 2), "ppl": round(ppl, 3),
           "size_MB": round(saved_size(model, tokenizer, folder) / 1e6, 2)}
    if not args.no_speed:
        row["decode_tok_s"] = round(decode_speed(model, repeats=args.speed_repeats), 1)
    row.update(extra)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500_000, help="training budget of each recovery run")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows for prune and gptq")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--losses", default="kl,ce", help="recovery runs, comma-separated: kl, ce, reverse_kl; "
                        "NAME@T sets the temperature (default 2)")
    parser.add_argument("--no-chain", action="store_true", help="skip prune -> distill -> gptq")
    parser.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurements")
    parser.add_argument("--speed-repeats", type=int, default=5)
    args = parser.parse_args()
    model_dir, data_dir = shared_or_skip("pydocs-llama-9m", "pydocs")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(model_dir))
    calib, eval_ids = load_windows(tokenizer, data_dir, args.samples, args.seqlen)
    eval_ids = eval_ids[: args.eval_windows]
    ctx = StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                      calibration=calib, model_path=model_dir, dtype="float32")
    meta = {"model": model_dir.name, "eval": f"test.txt, first {eval_ids.shape[0]} windows of {args.seqlen} tokens",
            "calibration": f"{args.samples} x {args.seqlen} tokens of train.txt", "threads": torch.get_num_threads(),
            "recovery": f"{args.tokens} tokens each, batch {args.batch_size} x {args.seqlen}, lr {args.lr}, "
                        "AdamW, 5% warm-up + cosine, kl at T=2 from the original"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    original = load_model(str(model_dir), "float32", "cpu")
    base_ppl = perplexity(original, eval_ids, batch_size=8)
    rows = [_row("original", original, base_ppl, tokenizer, tmp / "original", args)]
    orig_speed = rows[0].get("decode_tok_s")
    del original
    if "prune" not in STEP_CONFIGS:
        print("skipping the recovery runs: this llmslim has no prune step yet")
        write_results("distill", rows, markdown_table(rows, list(rows[0])), meta)
        return
    pruned = load_model(str(model_dir), "float32", "cpu")
    with Timer() as timer:
        pruning = run_step(pruned, STEP_CONFIGS["prune"](heads=0.25, mlp=0.25), ctx)
    meta["prune_applied"] = {k: v for k, v in pruning.changed.items() if not isinstance(v, (list, dict))}
    pruned_ppl = perplexity(pruned, eval_ids, batch_size=8)
    cfg, ref = pruned.config, load_model(str(model_dir), "float32", "cpu").config
    label = (f"pruned to {cfg.num_attention_heads}/{ref.num_attention_heads} heads, "
             f"{cfg.intermediate_size}/{ref.intermediate_size} mlp")
    rows.append(_row(label, pruned, pruned_ppl, tokenizer, tmp / "pruned", args,
                     step_s=round(timer.seconds, 1)))
    pruned_dir = tmp / "pruned"
    del pruned
    curves, kl_student = {}, None
    for run_name in [x.strip() for x in args.losses.split(",") if x.strip()]:
        loss, _, temperature = run_name.partition("@")  # kl@1.0: forward KL at temperature 1
        config = DistillConfig(dataset=f"text:{data_dir / 'train.txt'}", eval_dataset=f"text:{data_dir / 'test.txt'}",
                               eval_windows=args.eval_windows, tokens=args.tokens, seqlen=args.seqlen,
                               batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
                               loss=loss, temperature=float(temperature or 2.0), eval_every=args.eval_every)
        student = load_model(str(pruned_dir), "float32", "cpu")
        with Timer() as timer:
            outcome = run_step(student, config, ctx)
        changed = outcome.changed
        ppl = perplexity(student, eval_ids, batch_size=8)
        share = (pruned_ppl - ppl) / (pruned_ppl - base_ppl) if pruned_ppl > base_ppl else float("nan")
        curves[run_name] = changed["curves"]
        label = f"pruned + distill {loss}" + (f" (T={config.temperature:g})" if loss != "ce" else "")
        rows.append(_row(label, student, ppl, tokenizer, tmp / f"distill-{run_name}", args,
                         recovered_pct=round(100 * share, 1), step_s=round(timer.seconds, 1),
                         train_tok_s=changed["tokens_per_s"], tokens=changed["tokens"]))
        kl_student = student if run_name == "kl" else kl_student
    if not args.no_chain and kl_student is not None:
        # group size 128 unless a pruned width (kept heads x head_dim, kept MLP channels) is not a multiple of it
        widths = [m.in_features for m in kl_student.modules() if isinstance(m, torch.nn.Linear)]
        group = 128 if all(w % 128 == 0 for w in widths) else 64
        meta["gptq_group_size"] = group
        with Timer() as timer:
            run_step(kl_student, GptqConfig(bits=4, group_size=group), ctx)
        ppl = perplexity(kl_student, eval_ids, batch_size=8)
        rows.append(_row(f"prune -> distill kl -> gptq w4 g{group}", kl_student, ppl, tokenizer, tmp / "chain", args,
                         step_s=round(timer.seconds, 1)))
    for row in rows:
        if orig_speed and row.get("decode_tok_s"):
            row["speed_x"] = round(row["decode_tok_s"] / orig_speed, 2)
        row["size_x"] = round(row["size_MB"] / rows[0]["size_MB"], 3)
        row["ppl_vs_original_%"] = round(100 * (row["ppl"] / base_ppl - 1), 1)
    columns = ["model", "params_M", "size_MB", "size_x", "ppl", "ppl_vs_original_%", "recovered_pct", "tokens",
               "train_tok_s", "step_s", "decode_tok_s", "speed_x"]
    table = markdown_table(rows, [c for c in columns if any(c in r for r in rows)])
    write_results("distill", rows, table, meta)
    (RESULTS / "distill-curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    png = plot_curves(curves, RESULTS / "distill.png")
    print(f"curves: {png}" if png else "curves: matplotlib not installed, no plot")


if __name__ == "__main__":
    main()
