"""What a distillation run records: its position (restored from checkpoints),
its result for the report, and a plot of its curves."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DistillResult", "Position", "plot_curves"]


@dataclass
class DistillResult:
    """What a distillation did, for the step's report."""

    steps: int
    tokens: int
    wall_seconds: float
    train_seconds: float
    perplexity_before: float
    perplexity_after: float
    teacher_perplexity: float | None
    curves: dict[str, list[dict[str, float]]]
    resumed_from_step: int | None
    world_size: int
    parallel: str | None
    autocast: str | None
    train_windows: int
    eval_windows: int
    eval_source: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_per_s"] = round(self.tokens_per_s, 1)
        for key in ("wall_seconds", "train_seconds"):
            out[key] = round(out[key], 3)
        return out


@dataclass
class Position:
    """Everything about the run's position that a checkpoint must restore."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    perplexity_before: float | None = None
    teacher_perplexity: float | None = None
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    pending: dict[str, float] = field(default_factory=dict)  # sums since the last curve point
    pending_steps: int = 0



def plot_curves(runs: dict[str, dict], path: Path) -> Path | None:
    """A PNG of training loss and evaluation perplexity against tokens, one line per
    run (``runs``: label -> a result's ``curves``); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for label, curves in runs.items():
        loss, ppl = curves.get("loss", []), curves.get("eval_perplexity", [])
        ax_loss.plot([p["tokens"] for p in loss], [p["loss"] for p in loss], label=label)
        ax_ppl.plot([p["tokens"] for p in ppl], [p["perplexity"] for p in ppl], marker="o", label=label)
    ax_loss.set(xlabel="tokens", ylabel="training loss (own objective)", title="loss")
    ax_ppl.set(xlabel="tokens", ylabel="perplexity", title="evaluation perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
