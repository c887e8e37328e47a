"""Stock transformers loads what every packing method writes (``make bench-interop-methods PEER_PYTHON=...``).

Quantizes ``../shared/models/pydocs-llama-9m`` with each method that packs the GPTQ
format (128 x 256 calibration tokens of pydocs train): ``gptq`` W4, ``awq`` W4
(scales and clipping, round to nearest), ``awq`` W3 with ``rounding: gptq``,
``awq`` W4 (dense, no clipping) then ``gptq`` W4, and ``signround`` W2 (200
iterations). Each checkpoint is saved, then loaded in a separate interpreter
with gptqmodel + optimum (``--peer-python``) by ``transformers.AutoModelForCausalLM``
with the backend it picks and with ``gptq_torch`` (fp16), and compared with
llmslim's own loader (fp32) on the first ``--eval-windows`` test windows:
perplexity both ways and the largest logit difference on two windows.

Skips (exit 0) when ../shared or the peer interpreter is absent.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from common import Timer, load_model, markdown_table, peer_main, perplexity, saved_size, torch, write_results

from llmslim.recipe.awq_config import AwqConfig
from llmslim.recipe.signround_config import SignroundConfig
from llmslim.recipe.steps import GptqConfig
from llmslim.steps import run_step

HERE = Path(__file__).resolve().parent
METHODS = {
    "gptq W4": lambda: [GptqConfig(bits=4, group_size=128)],
    "awq W4 (format gptq)": lambda: [AwqConfig(bits=4, group_size=128, format="gptq")],
    "awq W3 rounding gptq": lambda: [AwqConfig(bits=3, group_size=128, rounding="gptq")],
    "awq W4 dense + gptq W4": lambda: [AwqConfig(bits=4, group_size=128, clip=False),
                                       GptqConfig(bits=4, group_size=128)],
    "signround W2": lambda: [SignroundConfig(bits=2, group_size=128, format="gptq")],
}
BACKENDS = ("", "gptq_torch")   # "": what transformers picks


def peer_load(python: str, ckpt: Path, windows: Path, out: Path, backend: str) -> dict:
    subprocess.run([python, str(HERE / "peer_gptqmodel.py"), "load", str(ckpt), str(windows), str(out), backend],
                   check=True)
    loaded = json.loads(out.read_text())
    loaded["logits"] = torch.load(f"{out}.logits.pt")
    return loaded


def method_row(name: str, model_dir: Path, tokenizer, ctx, windows, tmp: Path, python: str) -> dict:
    model = load_model(str(model_dir), "float32", "cpu")
    with Timer() as timer:
        for config in METHODS[name]():
            run_step(model, config, ctx)
    ckpt = tmp / name.replace(" ", "_")
    saved_size(model, tokenizer, ckpt)
    own = load_model(str(ckpt), "float32", "cpu")
    with torch.no_grad():
        own_logits = own(input_ids=windows[:2]).logits.float()
    meta = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    row = {"method": name, "bits": meta["bits"], "desc_act": meta.get("desc_act"),
           "quant_method": meta.get("meta", {}).get("method"), "llmslim_ppl": round(perplexity(own, windows), 3),
           "quantize_s": round(timer.seconds, 1)}
    for backend in BACKENDS:
        label = backend or "auto"
        loaded = peer_load(python, ckpt, tmp / "windows.pt", tmp / f"{ckpt.name}-{label}.json", backend)
        row[f"hf_{label}_kernels"] = ",".join(loaded["kernels"])
        row[f"hf_{label}_ppl"] = round(loaded["perplexity"], 3)
        row[f"hf_{label}_max_logit_diff"] = round((loaded["logits"] - own_logits).abs().max().item(), 4)
    return row


def main() -> None:
    args, model_dir, tokenizer, windows, ctx, base = peer_main(__doc__.splitlines()[0], 16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(windows, tmp / "windows.pt")
        for name in METHODS:
            rows.append(method_row(name, model_dir, tokenizer, ctx, windows, tmp, args.peer_python))
            print(rows[-1], flush=True)
    table = markdown_table(rows, list(rows[0]))
    write_results("interop-methods", rows, table,
                  {"model": model_dir.name, "original_ppl": round(base, 3), "calibration": "128 x 256 pydocs train",
                   "eval": f"first {windows.shape[0]} windows of 256 tokens of test.txt",
                   "hf": "transformers AutoModelForCausalLM, fp16 on CPU, through optimum + gptqmodel",
                   "peer": args.peer_python})


if __name__ == "__main__":
    main()
