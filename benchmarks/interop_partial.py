"""Interop of a partial-group GPTQ checkpoint (issue 15):
``python interop_partial.py --peer-python PATH``.

``../shared/models/pydocs-llama-9m`` with its MLP pruned to 688 channels (what
``round_to: 8`` pruning produces), then GPTQ W4 g128: ``down_proj`` has 688
inputs, so its last group holds 48 columns. The checkpoint is evaluated through
llmslim's own loader (fp32 and bf16) and through stock transformers + gptqmodel
in the peer venv (``backend="gptq_torch"``: gptqmodel's default kernel choice
refuses widths the group size does not divide). Writes
``results/interop_partial.{md,json}``. Skips (exit 0) without ../shared or
the peer interpreter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from common import load_model, markdown_table, peer_setup, perplexity, saved_size, torch, write_results

from llmslim.recipe.steps import GptqConfig, PruneConfig
from llmslim.steps import run_step

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default="")
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args()
    model_dir, tokenizer, windows, ctx = peer_setup(args.peer_python, 32, args.eval_windows)
    model = load_model(str(model_dir), "float32", "cpu")
    run_step(model, PruneConfig(mlp={"keep": 688}), ctx)
    pruned = perplexity(model, windows, batch_size=8)
    run_step(model, GptqConfig(bits=4, group_size=128), ctx)
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "llmslim-w4g128-i688"
        saved_size(model, tokenizer, ckpt)
        torch.save(windows, tmp / "windows.pt")
        for dtype in ("float32", "bfloat16"):
            own = load_model(str(ckpt), dtype, "cpu")
            with torch.no_grad():
                logits = own(input_ids=windows[:2]).logits.float()
            kernels = sorted({m.kernel for m in own.modules() if hasattr(m, "qweight")})
            rows.append({"loader": f"llmslim ({dtype})", "kernels": ",".join(kernels),
                         "perplexity": round(perplexity(own, windows, batch_size=8), 3), "logits": logits})
        subprocess.run([args.peer_python, str(HERE / "peer_gptqmodel.py"), "load", str(ckpt),
                        str(tmp / "windows.pt"), str(tmp / "hf.json"), "gptq_torch"], check=True)
        hf = json.loads((tmp / "hf.json").read_text())
        rows.append({"loader": "transformers + gptqmodel (gptq_torch, fp16)", "kernels": ",".join(hf["kernels"]),
                     "perplexity": round(hf["perplexity"], 3), "logits": torch.load(tmp / "hf.json.logits.pt")})
    reference = rows[0]["logits"]
    for row in rows:
        row["max_abs_logit_diff_vs_llmslim_fp32"] = round((row.pop("logits") - reference).abs().max().item(), 4)
    table = markdown_table(rows, ["loader", "kernels", "perplexity", "max_abs_logit_diff_vs_llmslim_fp32"])
    write_results("interop_partial", rows, table, {
        "model": f"{model_dir.name}, MLP pruned 768 -> 688 (perplexity {pruned:.3f}), GPTQ W4 g128",
        "down_proj": {"in_features": down.in_features, "groups": int(down.scales.shape[0]),
                      "qweight": list(down.qweight.shape)},
        "calibration": "32 x 256 pydocs train", "eval": f"first {windows.shape[0]} windows of 256 tokens",
        "peer": args.peer_python})


if __name__ == "__main__":
    main()
