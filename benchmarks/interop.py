"""Interop and side-by-side check against GPTQModel (``make bench-interop PEER_PYTHON=...``).

Quantizes ``../shared/models/pydocs-llama-9m`` with llmslim's GPTQ (W4 g128 and
W3 g128, 128 x 256 calibration tokens of pydocs train), then in a separate
interpreter that has gptqmodel + optimum (``--peer-python``):

1. loads llmslim's W4 checkpoint with stock ``transformers`` and compares its
   logits and perplexity with llmslim's own loader (the interop check);
2. quantizes the same model with GPTQModel on the same calibration windows
   and reports its perplexity beside llmslim's (the side-by-side), both as
   GPTQModel evaluates it (fp16) and through llmslim's loader and evaluation
   (the same path as llmslim's own result: the fair comparison).

Every perplexity uses the first ``--eval-windows`` test windows.

Skips (exit 0) when ../shared or the peer interpreter is absent.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from common import Timer, load_model, markdown_table, peer_main, perplexity, saved_size, torch, write_results

from llmslim.recipe.steps import GptqConfig
from llmslim.steps import run_step

HERE = Path(__file__).resolve().parent


def peer(python: str, *args: str) -> None:
    subprocess.run([python, str(HERE / "peer_gptqmodel.py"), *map(str, args)], check=True)


def main() -> None:
    args, model_dir, tokenizer, windows, ctx, base = peer_main(__doc__.splitlines()[0], 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(ctx.calibration, tmp / "calib.pt")
        torch.save(windows, tmp / "windows.pt")
        for bits in (4, 3):
            model = load_model(str(model_dir), "float32", "cpu")
            with Timer() as timer:
                run_step(model, GptqConfig(bits=bits, group_size=128), ctx)
            ours = perplexity(model, windows, batch_size=8)
            ckpt = tmp / f"llmslim-w{bits}"
            saved_size(model, tokenizer, ckpt)
            row = {"bits": bits, "group": 128, "original_ppl": round(base, 3), "llmslim_ppl": round(ours, 3),
                   "llmslim_increase_%": round(100 * (ours / base - 1), 3), "llmslim_s": round(timer.seconds, 1)}
            if bits == 4:
                with torch.no_grad():
                    own_logits = load_model(str(ckpt), "float32", "cpu")(input_ids=windows[:2]).logits.float()
                peer(args.peer_python, "load", ckpt, tmp / "windows.pt", tmp / "load.json")
                loaded = json.loads((tmp / "load.json").read_text())
                hf_logits = torch.load(tmp / "load.json.logits.pt")
                row["hf_load_kernels"] = ",".join(loaded["kernels"])
                row["hf_load_ppl"] = round(loaded["perplexity"], 3)
                row["hf_vs_llmslim_max_abs_logit_diff"] = round((hf_logits - own_logits).abs().max().item(), 4)
            peer(args.peer_python, "quantize", model_dir, tmp / "calib.pt", tmp / "windows.pt", bits, 128,
                 tmp / f"gptqmodel-{bits}.json")
            theirs = json.loads((tmp / f"gptqmodel-{bits}.json").read_text())
            row["gptqmodel_ppl"] = round(theirs["perplexity"], 3)
            row["gptqmodel_increase_%"] = round(100 * (theirs["perplexity"] / base - 1), 3)
            # the same evaluation path for both: GPTQModel's checkpoint through llmslim's loader and kernels
            same_path = perplexity(load_model(str(tmp / f"gptqmodel-{bits}.json.ckpt"), "float32", "cpu"), windows,
                                   batch_size=8)
            row["gptqmodel_ppl_llmslim_eval"] = round(same_path, 3)
            row["gptqmodel_increase_llmslim_eval_%"] = round(100 * (same_path / base - 1), 3)
            row["gptqmodel_s"] = round(theirs["quantize_seconds"], 1)
            rows.append(row)
            print(row, flush=True)
    columns = list(rows[0].keys() | rows[-1].keys())
    order = ["bits", "group", "original_ppl", "llmslim_ppl", "llmslim_increase_%", "gptqmodel_ppl",
             "gptqmodel_increase_%", "gptqmodel_ppl_llmslim_eval", "gptqmodel_increase_llmslim_eval_%", "llmslim_s", "gptqmodel_s", "hf_load_kernels", "hf_load_ppl",
             "hf_vs_llmslim_max_abs_logit_diff"]
    table = markdown_table(rows, [c for c in order if c in columns])
    write_results("interop", rows, table, {"model": model_dir.name, "calibration": "128 x 256 pydocs train",
                                           "eval": f"first {windows.shape[0]} windows of 256 tokens of test.txt",
                                           "peer": args.peer_python})


if __name__ == "__main__":
    main()
