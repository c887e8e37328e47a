"""Training data of the distillation step.

The dataset is tokenized once (documents joined with a blank line) and cut
into non-overlapping windows of ``seqlen`` tokens. Optimizer step ``s`` takes
the global samples ``s * batch_size ...`` of an endless stream of epochs, each
epoch a permutation of the windows drawn from ``(seed, epoch)``: the order is a
function of the seed and the step alone, so a resumed run and any number of
ranks see the same batches. Unless ``eval_dataset`` is given, the last windows
of the text (at most ``eval_windows`` and 10% of it) are held out for
evaluation and never trained on.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from llmslim.data import hash_token_ids, load_documents, parse_dataset
from llmslim.errors import UsageError
from llmslim.evaluate.perplexity import eval_windows, tokenize_text
from llmslim.recipe.steps import DistillConfig

__all__ = ["mix_seed", "DistillData", "build_data", "SampleOrder", "lr_factor", "HELD_OUT_SHARE"]

HELD_OUT_SHARE = 0.1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class DistillData:
    """Training and evaluation windows, ``[n, seqlen]`` token ids each."""

    train: torch.Tensor
    evaluation: torch.Tensor
    eval_source: str

    def digest(self) -> str:
        return hashlib.sha256((hash_token_ids(self.train) + hash_token_ids(self.evaluation)).encode()).hexdigest()


def build_data(config: DistillConfig, tokenizer) -> DistillData:
    """Tokenize the training (and evaluation) text and cut it into windows."""
    seqlen = config.seqlen
    ids = tokenize_text(tokenizer, load_documents(parse_dataset(config.dataset)))
    if config.eval_dataset is not None:
        eval_ids = tokenize_text(tokenizer, load_documents(parse_dataset(config.eval_dataset)))
        evaluation, source = eval_windows(eval_ids, seqlen, config.eval_windows), config.eval_dataset
        train_ids = ids
    else:
        windows = ids.numel() // seqlen
        held = min(config.eval_windows, int(windows * HELD_OUT_SHARE))
        if held < 1:
            raise UsageError(f"distill: the training text has {ids.numel()} tokens, too few to hold out an evaluation "
                             f"window of {seqlen} tokens (10% of it is used); give `eval_dataset` or more text")
        cut = (windows - held) * seqlen
        train_ids, evaluation = ids[:cut], ids[cut : cut + held * seqlen].view(held, seqlen)
        source = f"held out: the last {held} windows of {config.dataset}"
    count = train_ids.numel() // seqlen
    if count < 1:
        raise UsageError(f"distill: the training text has {train_ids.numel()} tokens, fewer than one window "
                         f"of seqlen={seqlen}")
    return DistillData(train_ids[: count * seqlen].view(count, seqlen).clone(), evaluation.clone(), source)


class SampleOrder:
    """Global sample ``i`` is window ``perm(i // n)[i % n]``: seeded epochs."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
            self._perms[epoch] = torch.randperm(self.count, generator=gen)
        return self._perms[epoch]

    def indices(self, start: int, n: int) -> torch.Tensor:
        """Window indices of global samples ``start .. start + n - 1``."""
        return torch.stack([self._perm(i // self.count)[i % self.count] for i in range(start, start + n)])


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at (0-based) ``step``: linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
