"""GPTQ vs round-to-nearest on the shared reference model (``make bench-gptq``).

Quantizes ``../shared/models/pydocs-llama-9m`` at 4, 3 and 2 bits, with groups
of 128 and per output channel, with RTN, plain GPTQ and GPTQ with act-order +
static groups + MSE scale search; prints and writes (benchmarks/results/gptq.*)
perplexity on ``../shared/data/pydocs/test.txt`` (seqlen 256), its increase
over the original, size on disk, quantization wall time, peak memory during
quantization, and decode tokens/s. ``--large`` adds the decode speed of a
randomly initialised ~1B-parameter Llama, dense vs packed 4-bit.
Skips (exit 0) when ../shared is absent.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import (Timer, decode_speed, load_model, load_tokenizer, load_windows, markdown_table, perplexity,
                    saved_size, shared_or_skip, torch, write_results)

from llmslim.evaluate.memory import PeakMemory
from llmslim.progress import Progress
from llmslim.recipe.steps import GptqConfig, RtnConfig
from llmslim.steps import StepContext, run_step

METHODS = {
    "rtn": lambda bits, gs: RtnConfig(bits=bits, group_size=gs),
    "gptq": lambda bits, gs: GptqConfig(bits=bits, group_size=gs, act_order=False, static_groups=False,
                                        scale_search="minmax"),
    "gptq+act_order+mse": lambda bits, gs: GptqConfig(bits=bits, group_size=gs, act_order=True,
                                                      static_groups=True, scale_search="mse"),
}
SETTINGS = [(4, 128), (4, -1), (3, 128), (3, -1), (2, 128), (2, -1)]


def quantize_one(model_dir, tokenizer, ctx, config, eval_ids, base_ppl, tmp: Path) -> dict:
    model = load_model(str(model_dir), "float32", "cpu")
    with Timer() as timer, PeakMemory(torch.device("cpu")) as peak:
        outcome = run_step(model, config, ctx)
    ppl = perplexity(model, eval_ids, batch_size=8)
    math_s = sum(s.get("seconds", 0.0) for s in outcome.layers)
    phases = outcome.changed.get("phase_seconds", {})
    return {
        "method": config.STEP_NAME if config.STEP_NAME == "rtn" else
        ("gptq+act_order+mse" if config.act_order else "gptq"),
        "bits": config.bits, "group": config.group_size, "ppl": round(ppl, 3),
        "increase_%": round(100 * (ppl / base_ppl - 1), 3),
        "size_MB": round(saved_size(model, tokenizer, tmp / f"{config.STEP_NAME}-{config.bits}-{config.group_size}") / 1e6, 2),
        "quant_s": round(timer.seconds, 2), "gptq_math_s": round(math_s, 2),
        "peak_MB": round(peak.peak_bytes / 1e6), "decode_tok_s": round(decode_speed(model), 1),
        "kernel": next((m.kernel for m in model.modules() if hasattr(m, "qweight")), "-"),
        "where_s": " / ".join(f"{k} {phases[k]:.1f}" for k in ("forward", "collect", "compress", "rerun")
                              if k in phases),
    }


def large_model_speed() -> list[dict]:
    """Decode speed where memory bandwidth dominates: a random ~1B Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmslim.quant.checkpoint import gptq_config_dict, install_quantized
    from llmslim.quant import QuantSpec, rtn_quantize_weight
    from llmslim.modeling import find_linears, linear_weight

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    rows = [{"model": f"random llama {params / 1e9:.2f}B", "weights": "fp32",
             "decode_tok_s": round(decode_speed(model, repeats=3, new=16), 2)}]
    model = model.to(torch.bfloat16)
    rows.append({"model": rows[0]["model"], "weights": "bf16", "decode_tok_s": round(decode_speed(model, 3, 64, 16), 2)})
    spec = QuantSpec(bits=4, group_size=128, sym=True)
    results = {}
    for name, module in find_linears(model, ["lm_head"]).items():
        results[name] = (rtn_quantize_weight(linear_weight(module).float(), spec), None)
    install_quantized(model, results, gptq_config_dict(bits=4, group_size=128, sym=True, desc_act=False,
                                                       method="rtn"))
    kernel = next(m.kernel for m in model.modules() if hasattr(m, "qweight"))
    rows.append({"model": rows[0]["model"], "weights": f"W4 g128 packed ({kernel})",
                 "decode_tok_s": round(decode_speed(model, 3, 64, 16), 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--large", action="store_true", help="also time a random ~1B model (slow)")
    args = parser.parse_args()
    model_dir, data_dir = shared_or_skip("pydocs-llama-9m", "pydocs")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = load_tokenizer(str(model_dir))
    calib, eval_ids = load_windows(tokenizer, data_dir, args.samples, args.seqlen)
    ctx = StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                      calibration=calib)
    original = load_model(str(model_dir), "float32", "cpu")
    base_ppl = perplexity(original, eval_ids, batch_size=8)
    rows = [{"method": "original (fp32)", "bits": 32, "group": "-", "ppl": round(base_ppl, 3), "increase_%": 0.0,
             "size_MB": round((model_dir / "model.safetensors").stat().st_size / 1e6, 2),
             "decode_tok_s": round(decode_speed(original), 1), "kernel": "dense"}]
    with tempfile.TemporaryDirectory() as tmp:
        for bits, gs in SETTINGS:
            for make in METHODS.values():
                rows.append(quantize_one(model_dir, tokenizer, ctx, make(bits, gs), eval_ids, base_ppl, Path(tmp)))
                print(rows[-1], flush=True)
    columns = ["method", "bits", "group", "ppl", "increase_%", "size_MB", "quant_s", "gptq_math_s", "where_s",
               "peak_MB", "decode_tok_s", "kernel"]
    table = markdown_table(rows, columns)
    meta = {"model": str(model_dir.name), "calibration": f"{args.samples} x {args.seqlen} tokens of train.txt",
            "eval": f"test.txt, seqlen {args.seqlen}, {eval_ids.shape[0]} windows", "threads": torch.get_num_threads()}
    if args.large:
        large = large_model_speed()
        table += "\n\n" + markdown_table(large, ["model", "weights", "decode_tok_s"])
    write_results("gptq", rows, table, meta)


if __name__ == "__main__":
    main()
