"""Structured pruning on the shared reference model (``make bench-prune``).

Prunes ``../shared/models/pydocs-llama-9m`` with the ``prune`` step: 25% of
the heads + 25% of the MLP channels with activation, taylor and magnitude
importance, and 1 and 2 whole layers by block influence. Prints and writes
(benchmarks/results/prune.*) parameters, perplexity on
``../shared/data/pydocs/test.txt`` (seqlen 256) and its increase, prefill and
decode tokens/s, each against the original. No recovery training: these are
one-shot numbers. Speeds are timed in interleaved rounds over all models and
each ratio (``_x``) is the median of side-by-side ratios, since the machine
may be shared. A second table times a larger randomly initialised Llama,
original vs pruned (width, depth, both), where speed is about compute and
memory traffic rather than quality (``--skip-large`` leaves it out).
Skips (exit 0) when ../shared is absent.
"""

from __future__ import annotations

import argparse
import statistics

from common import Timer, load_model, load_tokenizer, load_windows, markdown_table, perplexity, shared_or_skip, \
    torch, write_results

from llmslim.evaluate.latency import measure_latency
from llmslim.modeling import count_parameters
from llmslim.progress import Progress
from llmslim.recipe.schema import LatencyConfig
from llmslim.recipe.steps import PruneConfig
from llmslim.steps import StepContext, run_step

SETTINGS = {
    "width 25% activation": PruneConfig(heads=0.25, mlp=0.25, importance="activation"),
    "width 25% taylor": PruneConfig(heads=0.25, mlp=0.25, importance="taylor"),
    "width 25% magnitude": PruneConfig(heads=0.25, mlp=0.25, importance="magnitude"),
    "mlp 50% activation": PruneConfig(mlp=0.5, importance="activation"),
    "mlp 50% taylor": PruneConfig(mlp=0.5, importance="taylor"),
    "mlp 50% magnitude": PruneConfig(mlp=0.5, importance="magnitude"),
    "depth -1 layer": PruneConfig(layers=1),
    "depth -2 layers": PruneConfig(layers=2),
}
COLUMNS = ["method", "heads (q/kv)", "intermediate", "layers", "params", "params_%", "ppl", "ppl_increase_%",
           "prefill_tok_s", "prefill_x", "decode_tok_s", "decode_x", "prune_s"]


def speed(model, repeats: int, prompt: int = 64, new: int = 64) -> tuple[float, float]:
    """(prefill, decode) tokens/s, medians over ``repeats`` runs."""
    result = measure_latency(model, LatencyConfig(prompt_tokens=prompt, new_tokens=new, repeats=repeats, warmup=1),
                             seed=0)
    return result.prefill_tokens_per_s, result.decode_tokens_per_s


def add_speeds(rows: list[dict], models: list, rounds: int, repeats: int) -> None:
    """Time every model in interleaved rounds (the machine may be shared), so that each speed ratio
    compares runs taken side by side; medians over rounds. ``rows[0]`` is the reference."""
    runs = [[speed(model, repeats) for model in models] for _ in range(rounds)]
    for i, row in enumerate(rows):
        for j, phase in enumerate(("prefill", "decode")):
            row[f"{phase}_tok_s"] = round(statistics.median(r[i][j] for r in runs), 1)
            row[f"{phase}_x"] = round(statistics.median(r[i][j] / r[0][j] for r in runs), 2)


def describe(model, name: str, base: dict | None, ppl: float | None, seconds: float | None) -> dict:
    cfg = model.config
    params = count_parameters(model)
    row = {"method": name, "heads (q/kv)": f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}",
           "intermediate": cfg.intermediate_size, "layers": cfg.num_hidden_layers, "params": params,
           "params_%": round(100 * params / (base or {"params": params})["params"], 1)}
    if ppl is not None:
        row["ppl"] = round(ppl, 3)
        row["ppl_increase_%"] = round(100 * (ppl / base["ppl"] - 1), 2) if base else 0.0
    if seconds is not None:
        row["prune_s"] = round(seconds, 2)
    return row


def reference_model_rows(args) -> tuple[list[dict], dict]:
    model_dir, data_dir = shared_or_skip("pydocs-llama-9m", "pydocs")
    tokenizer = load_tokenizer(str(model_dir))
    calib, eval_ids = load_windows(tokenizer, data_dir, args.samples, args.seqlen)
    ctx = StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                      calibration=calib)
    original = load_model(str(model_dir), "float32", "cpu")
    base = describe(original, "original", None, perplexity(original, eval_ids, batch_size=8), None)
    rows, models = [base], [original]
    for name, config in SETTINGS.items():
        model = load_model(str(model_dir), "float32", "cpu")
        with Timer() as timer:
            outcome = run_step(model, config, ctx)
        row = describe(model, name, base, perplexity(model, eval_ids, batch_size=8), timer.seconds)
        row["notes"], row["layers_removed"] = outcome.changed["notes"], outcome.changed["layers_removed"]
        rows.append(row)
        models.append(model)
        print(row, flush=True)
    add_speeds(rows, models, args.rounds, args.repeats)
    meta = {"model": model_dir.name, "calibration": f"{args.samples} x {args.seqlen} tokens of train.txt",
            "eval": f"test.txt, seqlen {args.seqlen}, {eval_ids.shape[0]} windows",
            "latency": f"prompt 64, 64 new tokens; median of {args.repeats} runs, {args.rounds} interleaved rounds",
            "threads": torch.get_num_threads()}
    return rows, meta


def large_model_rows(args) -> list[dict]:
    """Speed only: a random Llama big enough that the matmuls dominate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)
    settings = {"width: heads 16->8, mlp -25%": PruneConfig(heads={"keep": 8}, mlp=0.25, importance="magnitude"),
                "depth: -3 of 12 layers": PruneConfig(layers=3),
                "both": PruneConfig(heads={"keep": 8}, mlp=0.25, layers=3, importance="magnitude")}
    calib = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    ctx = StepContext(tokenizer=None, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                      calibration=calib)

    def fresh():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    models = [fresh()]
    rows = [describe(models[0], "random llama (original)", None, None, None)]
    for name, prune in settings.items():
        models.append(fresh())
        with Timer() as timer:
            run_step(models[-1], prune, ctx)
        rows.append(describe(models[-1], name, rows[0], None, timer.seconds))
    add_speeds(rows, models, args.rounds, max(2, args.repeats // 2))
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="latency runs per model and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over all models")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--skip-large", action="store_true", help="leave out the random larger model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, meta = reference_model_rows(args)
    table = markdown_table(rows, COLUMNS)
    if not args.skip_large:
        large = large_model_rows(args)
        meta["large"] = "random Llama 1024 hidden, 16/4 heads, 2816 MLP, 12 layers; speed only"
        table += "\n\n" + markdown_table(large, ["method", "heads (q/kv)", "intermediate", "layers", "params",
                                                 "params_%", "prefill_tok_s", "prefill_x", "decode_tok_s",
                                                 "decode_x", "prune_s"])
        rows = rows + large
    write_results("prune", rows, table, meta)


if __name__ == "__main__":
    main()
