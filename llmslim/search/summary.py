"""What a search writes for people: pareto.png (matplotlib, headless) and search.md."""

from __future__ import annotations

from pathlib import Path

from llmslim.search.records import SearchReport, Trial

__all__ = ["plot_front", "markdown", "trial_label", "ranked"]


def trial_label(trial: Trial) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in trial.overrides.items()) or f"trial {trial.index}"


def ranked(trials: list[Trial]) -> list[Trial]:
    """Finished trials by score (lowest first), then the failed ones."""
    def key(t: Trial):
        return (t.status == "failed", t.score is None, t.score or 0.0, t.index)

    return sorted(trials, key=key)


def _panels(search: SearchReport) -> list[tuple[str, str]]:
    finished = [t for t in search.trials if t.metrics is not None]
    panels = [("size (MB)", "size")]
    if any(t.relative.time is not None for t in finished):
        panels.append((f"{search.objective.get('time', 'decode')} time (relative)", "time"))
    if any(t.relative.energy is not None for t in finished):
        panels.append(("energy per token (relative)", "energy"))
    return panels


def _x(trial: Trial, which: str) -> float | None:
    if which == "size":
        return trial.metrics.size_bytes / 1e6
    return getattr(trial.relative, which)


def _plane_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats on both axes (lower is better), by increasing x: the front of one
    projection. The search's own front is over every criterion at once, so it can zigzag here."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_front(search: SearchReport, path: Path) -> Path | None:
    """Perplexity increase against size, time and (where measured) energy: the front's members in
    blue, each plane's own front as a dashed staircase, the selected point circled. None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    finished = [t for t in search.trials if t.metrics is not None and t.relative.perplexity is not None]
    panels = _panels(search)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (label, which) in zip(axes[0], panels):
        pts = [(x, (t.relative.perplexity - 1) * 100, t) for t in finished if (x := _x(t, which)) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="0.6", label="trial")
        front = [p for p in pts if p[2].pareto]
        ax.scatter([p[0] for p in front], [p[1] for p in front], color="tab:blue",
                   label="Pareto front (all criteria)")
        plane = _plane_front([(x, y) for x, y, _ in pts])
        ax.step([p[0] for p in plane], [p[1] for p in plane], where="post", color="tab:blue", alpha=0.5,
                linestyle="--", label="front in this plane")
        for x, y, t in pts:
            if t.selected:
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, label="selected")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity increase (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"llmslim search {search.name}: {len(finished)} of {len(search.trials)} trials finished")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _num(value, spec: str = "{:.3f}") -> str:
    return "-" if value is None else spec.format(value)


def table_rows(search: SearchReport) -> list[list[str]]:
    """rank, trial, values, status, ppl, size, T, E, score, front, shared: one row per trial."""
    rows = []
    for rank, t in enumerate(ranked(search.trials), 1):
        m = t.metrics
        rows.append([str(rank), str(t.index), trial_label(t), t.status,
                     _num(m.perplexity if m else None), _num(m.size_bytes / 1e6 if m else None, "{:.2f}"),
                     _num(t.relative.perplexity), _num(t.relative.time), _num(t.relative.energy),
                     _num(t.score, "{:.4f}"), ("selected " if t.selected else "") + ("yes" if t.pareto else ""),
                     ",".join(map(str, t.shared_steps)) or "-"])
    return rows


HEADERS = ["rank", "trial", "values", "status", "perplexity", "size MB", "P", "T", "E", "score", "front",
           "shared steps"]


def markdown(search: SearchReport, plot: str | None) -> str:
    o = search.objective
    lines = [f"# llmslim search: {search.name}", "",
             f"{len(search.trials)} trials, status **{search.status}**, select `{search.select}`, "
             f"sampler `{search.sampler}`. Score = P^{o['perplexity_exponent']} x "
             f"({o['time_weight']} T + {o['energy_weight']} E), relative to the original "
             f"(perplexity {search.baseline.perplexity:.3f}, {search.baseline.size_bytes / 1e6:.2f} MB); "
             f"T = {o['time']} time. Lower is better.", ""]
    if search.objective_note:
        lines += [f"Note: {search.objective_note}", ""]
    env = search.environment
    lines += [f"Timed on {env.cpu or env.platform} ({env.torch_threads} torch threads"
              f"{', GPU ' + env.gpu if env.gpu else ''}); each trial timed alternately with the original.",
              f"Steps computed: {search.steps_computed}, reused from earlier trials: {search.steps_reused}; "
              f"{search.wall_seconds:.1f} s in all.", ""]
    lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(search)]
    failed = [t for t in search.trials if t.error]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- trial {t.index}: {t.error}" for t in failed]
    if plot:
        lines += ["", f"![Pareto front]({plot})"]
    return "\n".join(lines) + "\n"
