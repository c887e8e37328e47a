"""Rich tables for reports, comparisons, plans and run summaries."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from llmslim.report import Metrics, Report

NOISY_SPREAD = 0.2  # = llmslim.evaluate.latency.NOISY_SPREAD (not imported: that pulls in torch)

__all__ = ["metrics_table", "report_tables", "compare_table", "summary_table", "plan_table", "plan_tables",
           "memory_plan_table", "memory_record_table", "search_table", "leaderboard_table"]

_ROWS = [
    ("perplexity", "perplexity", "{:.3f}"),
    ("parameters", "parameters", "{:,}"),
    ("size (MB)", "size_bytes", "mb"),
    ("bits/parameter", "bits_per_parameter", "{:.2f}"),
    ("peak memory (MB)", "peak_memory_bytes", "mb"),
    ("prefill tok/s (median)", "prefill_tokens_per_s", "{:.1f}"),
    ("prefill spread", "prefill_tokens_per_s_spread", "spread"),
    ("decode tok/s (median)", "decode_tokens_per_s", "{:.1f}"),
    ("decode tok/s (p90)", "decode_tokens_per_s_p90", "{:.1f}"),
    ("decode spread", "decode_tokens_per_s_spread", "spread"),
    ("energy J/token", "energy_j_per_token", "{:.4g}"),
    ("linear kernel", "linear_kernel", "{}"),
]
_NO_DELTA = {"linear_kernel", "prefill_tokens_per_s_spread", "decode_tokens_per_s_spread"}
_NOISY_NOTE = f"timings noisy: spread > {NOISY_SPREAD:.0%}; rerun on a quiet machine"


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "mb":
        return f"{value / 1e6:,.2f}"
    if spec == "spread":  # (p90 - p10) / median of the per-run times
        return f"{value:.0%}" + (" !" if value > NOISY_SPREAD else "")
    return spec.format(value)


def _delta(base, new) -> str:
    if not isinstance(base, (int, float)) or not isinstance(new, (int, float)) or not base:
        return ""
    return f"{(new / base - 1) * 100:+.1f}%"


def _cell(metrics: Metrics | None, key: str, spec: str) -> str:
    value = getattr(metrics, key, None) if metrics else None
    if value is None and metrics is not None and key in metrics.invalid:
        return "invalid"
    return _fmt(value, spec)


def _notes(columns: dict[str, Metrics | None]) -> list[tuple[str, str]]:
    """Caption lines (text, style): noisy timings, alternate timing, invalid values."""
    measured = {name: m for name, m in columns.items() if m is not None}
    spreads = [s for m in measured.values()
               for s in (m.prefill_tokens_per_s_spread, m.decode_tokens_per_s_spread) if s is not None]
    lines = []
    if any(s > NOISY_SPREAD for s in spreads):
        lines.append((_NOISY_NOTE, "bold yellow"))
    timed = [m.latency_interleaved_with for m in measured.values() if m.decode_tokens_per_s is not None]
    if len(timed) == 2 and all(timed):
        lines.append(("tok/s: both models timed alternately in the same process", ""))
    for name, m in measured.items():
        lines += [(f"{name}: {reason}", "red") for reason in m.invalid.values()]
    return lines


def metrics_table(columns: dict[str, Metrics | None], title: str = "", notes: list[str] | None = None) -> Table:
    """One column per model; with two, a change column. Names, title and notes are plain text."""
    table = Table(title=Text(title) if title else None)
    table.add_column("metric")
    names = list(columns)
    for name in names:
        table.add_column(Text(name), justify="right")
    with_delta = len(names) == 2
    if with_delta:
        table.add_column("change", justify="right")
    for label, key, spec in _ROWS:
        values = [getattr(m, key, None) if m else None for m in columns.values()]
        row = [label] + [_cell(m, key, spec) for m in columns.values()]
        if with_delta:
            row.append(_delta(values[0], values[1]) if key not in _NO_DELTA else "")
        table.add_row(*(Text(cell) for cell in row))
    lines = _notes(columns) + [(note, "yellow") for note in notes or []]
    if lines:
        caption = Text(justify="left")
        for i, (line, style) in enumerate(lines):
            caption.append(("\n" if i else "") + line, style=style or None)
        table.caption = caption
    return table


SUMMARY_ENTRIES = 4  # scalar entries of a step's `changed` shown in the steps table
SUMMARY_WIDTH = 60


def changed_summary(changed: dict) -> str:
    """A short line from a step's ``changed``: its first few scalar entries, whole ones only. Lists and
    mappings (curves, phase timings) stay in report.json."""
    parts, more = [], False
    for key, value in changed.items():
        if value is None or isinstance(value, (dict, list, tuple)):
            more = more or value is not None
            continue
        entry = f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        if len(parts) == SUMMARY_ENTRIES or (parts and len(", ".join(parts + [entry])) > SUMMARY_WIDTH):
            more = True
            break
        parts.append(entry if len(entry) <= SUMMARY_WIDTH else entry[: SUMMARY_WIDTH - 3] + "...")
    return ", ".join(parts) + (", ..." if more and parts else "")


def _row(*cells: str) -> list[Text]:
    """Table cells as plain text: names, paths and messages are never read as rich markup."""
    return [Text(str(cell)) for cell in cells]


def report_tables(report: Report) -> list[Table]:
    title = f"{report.name}: {report.status}" + (f" ({report.error})" if report.error else "")
    tables = [metrics_table({"baseline": report.baseline, "result": report.result}, title)]
    if report.steps:
        steps = Table(title="steps", caption="all of each step's changes: `steps` in report.json")
        for col in ("step", "seconds", "peak MB", "summary"):
            steps.add_column(col)
        for s in report.steps:
            steps.add_row(*_row(s.name, f"{s.wall_seconds:.1f}", _fmt(s.peak_memory_bytes, "mb"),
                                changed_summary(s.changed)))
        tables.append(steps)
    if report.budgets:
        budgets = Table(title="budgets")
        for col in ("budget", "limit", "actual", "passed"):
            budgets.add_column(col)
        for b in report.budgets:
            actual = "-" if b.actual is None else f"{b.actual:.4g}"
            cells = _row(b.name, f"{b.limit:.4g}", actual + (f" ({b.note})" if b.note else ""))
            budgets.add_row(*cells, Text("yes") if b.passed else Text("NO", style="red"))
        tables.append(budgets)
    if report.memory is not None and report.memory.phases:
        tables.append(memory_record_table(report.memory))
    return tables


def _environment_notes(a: Report, b: Report) -> list[str]:
    """Why the two results' speeds may not be comparable: different CPU, GPU or threads."""
    notes = []
    for label, key in (("CPU", "cpu"), ("GPU", "gpu"), ("torch threads", "torch_threads")):
        va, vb = getattr(a.environment, key), getattr(b.environment, key)
        if va is not None and vb is not None and va != vb:
            notes.append(f"speeds not comparable: {label} {va} ({a.name}) vs {vb} ({b.name})")
    return notes


def compare_table(a: Report, b: Report) -> Table:
    return metrics_table({a.name: a.result, b.name: b.result}, "comparison of results",
                         notes=_environment_notes(a, b))


def summary_table(rows: list[tuple[str, str, int, str]]) -> Table:
    table = Table(title="summary")
    for col in ("recipe", "status", "exit", "output"):
        table.add_column(col)
    for name, status, code, output in rows:
        table.add_row(*_row(name, status, code, output))
    return table


def plan_table(plan) -> Table:
    table = Table(title=Text(f"plan: {plan.name} (dry run, nothing loaded)"))
    table.add_column("item")
    table.add_column("value")
    table.add_row(*_row("model", plan.model))
    table.add_row(*_row("output", plan.output))
    for i, step in enumerate(plan.steps, 1):
        table.add_row(*_row(f"step {i}", step))
    table.add_row(*_row("parameters", _fmt(plan.parameters, "{:,}")))
    table.add_row(*_row("weights (MB)", _fmt(plan.weights_bytes, "mb")))
    table.add_row(*_row("estimated peak (MB)", _fmt(plan.estimated_peak_bytes, "mb")))
    if not plan.weights_local:
        table.add_row(Text("weights"), Text("not yet local: the run needs them downloaded first", style="yellow"))
    table.add_row(*_row("note", plan.note))
    return table


def _limit(value) -> str:
    return "none" if value is None else f"{value / 1e6:,.0f} MB"


def memory_plan_table(memory) -> Table:
    """The memory plan (llmslim.memory_plan.MemoryPlan): each phase's mode and estimated peaks."""
    from llmslim.memory_estimates import HEADROOM

    title = (f"memory plan on {memory.device}: device limit {_limit(memory.device_limit)}, host limit "
             f"{_limit(memory.host_limit)} ({memory.limits_from})")
    caption = list(memory.notes) + [f"a phase fits when its estimate is at most {HEADROOM:.0%} of the limit; "
                                     "estimates from the config alone; seconds are rough"]
    if memory.device == "cpu":
        caption.append("on cpu the device is the host: one memory, the process's resident set")
    table = Table(title=Text(title), caption=Text("\n".join(caption)))
    for col in ("phase", "mode", "device MB", "host MB", "s", "acts on", "why"):
        table.add_column(col, justify="right" if col.endswith(("MB", "s")) and col != "acts on" else "left",
                         no_wrap=col == "phase", overflow="fold")
    for p in memory.phases:
        cells = _row(p.phase, p.mode, _fmt(p.device_bytes, "mb"), _fmt(p.host_bytes, "mb"),
                     _fmt(p.seconds, "{:.1f}"), p.activations, p.reason)
        if not p.fits:
            cells[-1].stylize("red")
        table.add_row(*cells)
    return table


def plan_tables(plan) -> list[Table]:
    """The dry run: the plan, then its memory plan per phase when the config was readable."""
    return [plan_table(plan)] + ([memory_plan_table(plan.memory)] if plan.memory is not None else [])


def memory_record_table(memory) -> Table:
    """A report's ``memory``: each phase's estimate beside what the run measured."""
    table = Table(title=Text(f"memory per phase on {memory.device}: estimated vs measured"),
                  caption=Text(f"host: {memory.host_measure or 'not measured'}; - : not run now"))
    for col in ("phase", "mode", "device MB est.", "device MB meas.", "host MB est.", "host MB meas.",
                "s est.", "s meas."):
        table.add_column(col, justify="left" if col in ("phase", "mode") else "right")
    for p in memory.phases:
        table.add_row(*_row(p.phase, p.mode, _fmt(p.estimated_device_bytes, "mb"),
                            _fmt(p.measured_device_bytes, "mb"), _fmt(p.estimated_host_bytes, "mb"),
                            _fmt(p.measured_host_bytes, "mb"), _fmt(p.estimated_seconds, "{:.1f}"),
                            _fmt(p.measured_seconds, "{:.1f}")))
    return table


# --- searches and leaderboards -------------------------------------------------------------------------

def search_table(search) -> Table:
    """The ranked trials of a search (a SearchReport): score, front, what was shared."""
    from llmslim.search.summary import HEADERS, table_rows

    o = search.objective
    title = (f"search {search.name}: {search.status}; score = P^{o['perplexity_exponent']} x "
             f"({o['time_weight']} T + {o['energy_weight']} E), lower is better")
    table = Table(title=Text(title))
    for header in HEADERS:
        table.add_column(header, justify="right" if header not in ("values", "status", "front") else "left")
    for row in table_rows(search):
        table.add_row(*_row(*row))
    notes = [search.objective_note] if search.objective_note else []
    notes.append(f"steps computed {search.steps_computed}, reused {search.steps_reused}; "
                 "P, T, E: perplexity, time and energy over the original's")
    table.caption = Text("\n".join(notes))
    return table


def _leader_rows(label: str, result) -> list[tuple]:
    """(label, status, baseline, metrics, score) for a run, or for each finished trial of a search."""
    if getattr(result, "kind", None) == "search":
        return [(f"{label} #{t.index}" + (" *" if t.selected else ""), t.status, result.baseline, t.metrics, t.score)
                for t in result.trials if t.metrics is not None]
    return [(label, result.status, result.baseline, result.result, None)]


def leaderboard_table(results: list[tuple[str, object]]) -> Table:
    """One table over several runs and searches, by perplexity increase (lowest first)."""
    rows = [r for label, result in results for r in _leader_rows(label, result)]

    def increase(row) -> float:
        base, metrics = row[2], row[3]
        if metrics is None or base is None or not base.perplexity or metrics.perplexity is None:
            return float("inf")
        return metrics.perplexity / base.perplexity - 1

    table = Table(title="leaderboard (* = a search's selected variant)")
    for col in ("result", "status", "perplexity", "change", "size MB", "decode tok/s", "energy J/token", "score"):
        table.add_column(col, justify="left" if col in ("result", "status") else "right")
    for row in sorted(rows, key=increase):
        label, status, base, m, score = row
        change = increase(row)
        table.add_row(*_row(label, status, _cell(m, "perplexity", "{:.3f}"),
                            "-" if change == float("inf") else f"{change * 100:+.2f}%",
                            _cell(m, "size_bytes", "mb"), _cell(m, "decode_tokens_per_s", "{:.1f}"),
                            _cell(m, "energy_j_per_token", "{:.4g}"), "-" if score is None else f"{score:.4f}"))
    return table
