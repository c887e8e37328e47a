"""Rich tables for reports, comparisons, plans and run summaries."""

from __future__ import annotations

from rich.table import Table

from llmslim.report import Metrics, Report

__all__ = ["metrics_table", "report_tables", "compare_table", "summary_table", "plan_table"]

_ROWS = [
    ("perplexity", "perplexity", "{:.3f}"),
    ("parameters", "parameters", "{:,}"),
    ("size (MB)", "size_bytes", "mb"),
    ("bits/parameter", "bits_per_parameter", "{:.2f}"),
    ("peak memory (MB)", "peak_memory_bytes", "mb"),
    ("prefill tok/s (median)", "prefill_tokens_per_s", "{:.1f}"),
    ("decode tok/s (median)", "decode_tokens_per_s", "{:.1f}"),
    ("decode tok/s (p90)", "decode_tokens_per_s_p90", "{:.1f}"),
    ("energy J/token", "energy_j_per_token", "{:.4g}"),
    ("linear kernel", "linear_kernel", "{}"),
]


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "mb":
        return f"{value / 1e6:,.2f}"
    return spec.format(value)


def _delta(base, new) -> str:
    if not isinstance(base, (int, float)) or not isinstance(new, (int, float)) or not base:
        return ""
    return f"{(new / base - 1) * 100:+.1f}%"


def metrics_table(columns: dict[str, Metrics | None], title: str = "") -> Table:
    table = Table(title=title or None)
    table.add_column("metric")
    names = list(columns)
    for name in names:
        table.add_column(name, justify="right")
    with_delta = len(names) == 2
    if with_delta:
        table.add_column("change", justify="right")
    for label, key, spec in _ROWS:
        values = [getattr(m, key, None) if m else None for m in columns.values()]
        row = [label] + [_fmt(v, spec) for v in values]
        if with_delta:
            row.append(_delta(values[0], values[1]) if key != "linear_kernel" else "")
        table.add_row(*row)
    return table


def report_tables(report: Report) -> list[Table]:
    title = f"{report.name}: {report.status}" + (f" ({report.error})" if report.error else "")
    tables = [metrics_table({"baseline": report.baseline, "result": report.result}, title)]
    if report.steps:
        steps = Table(title="steps")
        for col in ("step", "seconds", "peak MB", "changed"):
            steps.add_column(col)
        for s in report.steps:
            changed = ", ".join(f"{k}={v}" for k, v in s.changed.items())
            steps.add_row(s.name, f"{s.wall_seconds:.1f}", _fmt(s.peak_memory_bytes, "mb"), changed)
        tables.append(steps)
    if report.budgets:
        budgets = Table(title="budgets")
        for col in ("budget", "limit", "actual", "passed"):
            budgets.add_column(col)
        for b in report.budgets:
            actual = "-" if b.actual is None else f"{b.actual:.4g}"
            budgets.add_row(b.name, f"{b.limit:.4g}", actual + (f" ({b.note})" if b.note else ""),
                            "yes" if b.passed else "[red]NO[/red]")
        tables.append(budgets)
    return tables


def compare_table(a: Report, b: Report) -> Table:
    return metrics_table({a.name: a.result, b.name: b.result}, "comparison of results")


def summary_table(rows: list[tuple[str, str, int, str]]) -> Table:
    table = Table(title="summary")
    for col in ("recipe", "status", "exit", "output"):
        table.add_column(col)
    for name, status, code, output in rows:
        table.add_row(name, status, str(code), output)
    return table


def plan_table(plan) -> Table:
    table = Table(title=f"plan: {plan.name} (dry run, nothing loaded)")
    table.add_column("item")
    table.add_column("value")
    table.add_row("model", plan.model)
    table.add_row("output", plan.output)
    for i, step in enumerate(plan.steps, 1):
        table.add_row(f"step {i}", step)
    table.add_row("parameters", _fmt(plan.parameters, "{:,}"))
    table.add_row("weights (MB)", _fmt(plan.weights_bytes, "mb"))
    table.add_row("estimated peak (MB)", _fmt(plan.estimated_peak_bytes, "mb"))
    table.add_row("note", plan.note)
    return table
