#!/usr/bin/env python
"""Train the demo model that ships with llmslim (``llmslim/demo_model/``).

What it does, offline and on a CPU:

1. Reads the builtin dataset ``stdlib-docs:train`` (the docstrings of the
   running Python's standard library, see ``llmslim/builtin_data.py``).
2. Trains a byte-level BPE tokenizer on it with the ``tokenizers`` library
   (2048 tokens, one special token ``<|endoftext|>`` that is bos, eos and pad;
   no token is added when text is tokenized) and saves it as a transformers
   fast tokenizer, so ``AutoTokenizer.from_pretrained(folder)`` works.
3. Builds a small ``LlamaForCausalLM`` with grouped-query attention (hidden
   128, 4 layers, 4 query heads and 2 key/value heads of 32, MLP 384, 512
   positions, untied ``lm_head``; about 1.3M parameters). The widths are
   multiples of 128 so the 4-bit kernels' layouts apply.
4. Trains it with AdamW (linear warm-up, then cosine decay to 10% of the peak
   rate) on 256-token windows of the train documents joined with a blank line
   and tokenized once: every epoch cuts the token stream into windows at a
   seeded random shift and shuffles them, batches of 16.
5. Measures the held-out perplexity on ``stdlib-docs:test`` by llmslim's
   standard protocol (documents joined with ``"\\n\\n"``, tokenized once,
   non-overlapping windows of 256 tokens, tail dropped, exp of the mean
   next-token loss) for the trained model AND for the same model before
   training (same seed), and writes everything to ``TRAINING.json``.
6. Saves the float32 weights (safetensors), config, generation config and
   tokenizer into a temporary sibling folder and swaps it into place.

Reproduce (7 to 11 minutes on 2 CPU cores)::

    . .venv/bin/activate
    python scripts/train_demo_model.py                 # writes llmslim/demo_model/
    python scripts/train_demo_model.py --out /tmp/demo --steps 20   # quick smoke run

Runs are seeded and use deterministic algorithms with a fixed thread count
(2), so a rerun on the same machine, Python and library versions gives the
same weights. The training text is the running Python's stdlib, so a
different Python version gives a (slightly) different model; TRAINING.json
records the versions used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: same results, but several
# times faster when other processes share the cores (must precede torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmslim.builtin_data import load_builtin  # noqa: E402
from llmslim.data import join_documents  # noqa: E402

SEED = 0
THREADS = 2
VOCAB_SIZE = 2048
SPECIAL = "<|endoftext|>"
SEQLEN = 256
BATCH = 16
# Chosen by measurement (batch 16 x 256 tokens, 2 threads): ~0.42 s/step on 2
# idle CPU cores, ~0.65 s/step while another process competes for them. 1000
# steps (~4.1M tokens, ~9 epochs) take 7-11 minutes, inside the ~12 minute
# budget with the tokenizer and the evaluations.
DEFAULT_STEPS = 1000
PEAK_LR = 3e-3
MIN_LR_RATIO = 0.1
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
MODEL_DIMS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384, max_position_embeddings=512)


def setup_determinism(seed: int) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception:  # pragma: no cover - older or exotic builds
        pass


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
                                   model_max_length=MODEL_DIMS["max_position_embeddings"],
                                   clean_up_tokenization_spaces=False)


def tokenize(tokenizer, docs: list[str]) -> torch.Tensor:
    """llmslim's protocol: documents joined with a blank line, tokenized once."""
    ids = tokenizer(join_documents(docs), verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def build_model(tokenizer, seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    special = tokenizer.convert_tokens_to_ids(SPECIAL)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=special,
                         eos_token_id=special, pad_token_id=special, **MODEL_DIMS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=special, eos_token_id=special, pad_token_id=special)
    return model


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = SEQLEN, batch: int = 16) -> tuple[float, int]:
    """exp(mean next-token loss) over non-overlapping windows (tail dropped); also the window count."""
    model.eval()
    count = ids.numel() // seqlen
    windows = ids[: count * seqlen].view(count, seqlen)
    nll, tokens = 0.0, 0
    for start in range(0, count, batch):
        x = windows[start : start + batch]
        logits = model(input_ids=x, use_cache=False).logits
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        tokens += x[:, 1:].numel()
    return math.exp(nll / tokens), count


def batches(ids: torch.Tensor, steps: int, seed: int):
    """``steps`` batches of [BATCH, SEQLEN]: epochs of shuffled windows at a random shift."""
    gen = torch.Generator().manual_seed(seed)
    produced, epoch = 0, 0
    while True:
        shift = int(torch.randint(0, SEQLEN, (1,), generator=gen))
        count = (ids.numel() - shift) // SEQLEN
        windows = ids[shift : shift + count * SEQLEN].view(count, SEQLEN)
        order = torch.randperm(count, generator=gen)
        for start in range(0, count - BATCH + 1, BATCH):
            yield epoch, windows[order[start : start + BATCH]]
            produced += 1
            if produced == steps:
                return
        epoch += 1


def lr_factor(step: int, steps: int) -> float:
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=BETAS, eps=1e-8)


def train(model, ids: torch.Tensor, steps: int, seed: int, log_every: int) -> tuple[list[dict], int]:
    model.train()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    log: list[dict] = []
    seen, running, t0 = 0, 0.0, time.perf_counter()
    for step, (epoch, x) in enumerate(batches(ids, steps, seed + 1)):
        out = model(input_ids=x, labels=x, use_cache=False)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        seen += x.numel()
        running += out.loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            entry = {"step": step + 1, "epoch": epoch, "loss": round(running / n, 4),
                     "lr": round(scheduler.get_last_lr()[0], 6), "elapsed_s": round(time.perf_counter() - t0, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            running = 0.0
    model.eval()
    return log, seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "llmslim" / "demo_model", help="output folder")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    import tokenizers
    import transformers

    start = time.perf_counter()
    setup_determinism(args.seed)
    train_docs, test_docs = load_builtin("stdlib-docs:train"), load_builtin("stdlib-docs:test")
    print(f"data: {len(train_docs)} train docs, {len(test_docs)} test docs", flush=True)

    tokenizer = train_tokenizer(train_docs)
    train_ids, test_ids = tokenize(tokenizer, train_docs), tokenize(tokenizer, test_docs)
    print(f"tokenizer: vocab {len(tokenizer)}; {train_ids.numel()} train tokens, {test_ids.numel()} test tokens",
          flush=True)

    model = build_model(tokenizer, args.seed)
    params = sum(p.numel() for p in model.parameters())
    untrained_ppl, test_windows = perplexity(model, test_ids)
    print(f"model: {params} parameters; untrained test perplexity {untrained_ppl:.2f}", flush=True)

    train_start = time.perf_counter()
    log, seen = train(model, train_ids, args.steps, args.seed, log_every=max(1, min(50, args.steps // 20)))
    train_s = time.perf_counter() - train_start
    trained_ppl, _ = perplexity(model, test_ids)
    train_ppl, _ = perplexity(model, train_ids[: 64 * SEQLEN])
    print(f"trained test perplexity {trained_ppl:.2f} (untrained {untrained_ppl:.2f}); "
          f"train sample {train_ppl:.2f}", flush=True)

    out = args.out.resolve()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        "script": "scripts/train_demo_model.py",
        "command": "python scripts/train_demo_model.py" + (f" --steps {args.steps}" if args.steps != DEFAULT_STEPS
                                                           else "") + (f" --seed {args.seed}" if args.seed else ""),
        "seed": args.seed,
        "steps": args.steps,
        "tokens_seen": seen,
        "epochs": round(seen / train_ids.numel(), 2),
        "wall_time_s": None,  # filled below
        "train_time_s": round(train_s, 1),
        "seconds_per_step": round(train_s / args.steps, 3),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "data": {
            "train": {"dataset": "builtin:stdlib-docs:train", "documents": len(train_docs),
                      "characters": len(join_documents(train_docs)), "tokens": train_ids.numel()},
            "test": {"dataset": "builtin:stdlib-docs:test", "documents": len(test_docs),
                     "characters": len(join_documents(test_docs)), "tokens": test_ids.numel()},
        },
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer), "special_tokens": [SPECIAL],
                      "bos_eos_pad": SPECIAL},
        "model": {"architecture": "LlamaForCausalLM", "parameters": params, "dtype": "float32",
                  "tie_word_embeddings": False, **MODEL_DIMS},
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY,
                      "grad_clip": GRAD_CLIP, "schedule": "linear warm-up then cosine to 10% of peak",
                      "warmup_steps": max(1, round(WARMUP_FRACTION * args.steps)), "batch_size": BATCH,
                      "seqlen": SEQLEN, "windows": "docs joined with a blank line, tokenized once; per epoch a "
                                                   "random shift, non-overlapping windows, shuffled"},
        "perplexity": {
            "protocol": "stdlib-docs:test joined with '\\n\\n', tokenized once, non-overlapping windows of 256 "
                        "tokens, tail dropped, exp(mean next-token loss)",
            "dataset": "builtin:stdlib-docs:test", "seqlen": SEQLEN, "windows": test_windows,
            "trained": round(trained_ppl, 3),
            "untrained": round(untrained_ppl, 3),
            "train_sample_trained": round(train_ppl, 3),
        },
        "loss_log": log,
    }
    record["wall_time_s"] = round(time.perf_counter() - start, 1)
    (tmp / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    for f in out.iterdir():
        f.chmod(0o644)  # save_pretrained may create private files; these ship in the package
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {record['wall_time_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
