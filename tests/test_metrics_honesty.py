"""Honest metrics: non-finite values become null with a reason, the environment
records threads and CPU, baseline and result are timed alternately with their
spread, and the table warns when timings are noisy."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from llmslim.cli import app
from llmslim.evaluate import evaluate_model, prepare_eval_windows, remeasure_latency, with_latency
from llmslim.evaluate.environment import cpu_model, environment_info
from llmslim.evaluate.energy import EnergyMeter
from llmslim.evaluate.latency import LatencyResult, measure_latency, measure_latency_pair, spread
from llmslim.evaluate.validity import LATENCY_KEYS, perplexity_reason, safe_exp, split_finite
from llmslim.modeling import load_model, load_tokenizer
from llmslim.recipe.schema import EvaluateConfig, LatencyConfig, PerplexityConfig
from llmslim.render import compare_table, metrics_table
from llmslim.report import Metrics, Report, read_report

LAT = LatencyConfig(prompt_tokens=8, new_tokens=4, repeats=3, warmup=1)


def _metrics(**kw) -> Metrics:
    base = dict(parameters=1000, size_bytes=4000, bits_per_parameter=32.0, device="cpu", dtype="float32")
    return Metrics(**{**base, **kw})


def _text(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return " ".join(console.export_text().split())  # the caption wraps at the table's width


def _eval_setup(model_factory, workdir, mutate):
    path = model_factory("llama")
    model = load_model(str(path), "float32", torch.device("cpu"))
    with torch.no_grad():
        mutate(model)
    cfg = EvaluateConfig(perplexity=PerplexityConfig(dataset=f"text:{workdir / 'data' / 'test.txt'}", seqlen=32,
                                                     max_windows=2), latency=LAT, energy=False)
    windows = prepare_eval_windows(cfg, load_tokenizer(str(path)))
    return evaluate_model(model, cfg, size_bytes=1000, windows=windows)


# --- non-finite metrics ------------------------------------------------------------------------------------------


def test_nan_weights_give_null_perplexity_with_a_reason(model_factory, workdir):
    metrics = _eval_setup(model_factory, workdir, lambda m: m.model.layers[0].mlp.down_proj.weight.fill_(math.nan))
    assert metrics.perplexity is None
    assert metrics.invalid["perplexity"].startswith("perplexity is nan")
    assert "logits are not finite" in metrics.invalid["perplexity"]
    text = json.dumps(metrics.model_dump(mode="json"), allow_nan=False)  # strict JSON: no bare NaN
    assert json.loads(text)["invalid"] == metrics.invalid
    assert metrics.decode_tokens_per_s > 0  # the other metrics are still measured


def test_perplexity_overflow_is_invalid_not_a_crash(model_factory, workdir):
    metrics = _eval_setup(model_factory, workdir, lambda m: m.lm_head.weight.mul_(1e5))
    assert metrics.perplexity is None
    assert "overflows" in metrics.invalid["perplexity"]


def test_healthy_model_has_no_invalid_metrics(model_factory, workdir):
    metrics = _eval_setup(model_factory, workdir, lambda m: None)
    assert metrics.invalid == {} and metrics.perplexity > 1
    assert metrics.decode_tokens_per_s_spread >= 0 and metrics.prefill_tokens_per_s_spread >= 0
    assert metrics.latency_interleaved_with is None


def test_validity_helpers():
    assert safe_exp(1e6) == math.inf and safe_exp(0.0) == 1.0 and math.isnan(safe_exp(math.nan))
    assert perplexity_reason(2.0) is None
    assert "nan" in perplexity_reason(math.nan) and "probability 0" in perplexity_reason(math.inf)
    assert "overflows" in perplexity_reason(1e4)
    clean, invalid = split_finite({"a": 1.0, "b": math.inf, "c": "x", "d": None}, {"b": "why b"})
    assert clean == {"a": 1.0, "b": None, "c": "x", "d": None} and invalid == {"b": "why b"}


def test_metrics_never_hold_non_finite_floats():
    m = _metrics(perplexity=math.inf, decode_tokens_per_s=math.nan)
    assert m.perplexity is None and m.decode_tokens_per_s is None
    assert set(m.invalid) == {"perplexity", "decode_tokens_per_s"}
    given = _metrics(perplexity=math.nan, invalid={"perplexity": "specific reason"})
    assert given.invalid == {"perplexity": "specific reason"}
    json.dumps(m.model_dump(mode="json"), allow_nan=False)


def _old_report(**metrics_extra) -> dict:
    """A report.json as written before this change (no invalid, spread, threads or cpu)."""
    metrics = dict(perplexity=12.5, parameters=1000, size_bytes=4000, bits_per_parameter=32.0,
                   decode_tokens_per_s=None, device="cpu", dtype="float32", **metrics_extra)
    env = dict(python="3.12", torch="2.5", transformers="4.5", llmslim="0.1", device="cpu (x86_64)", platform="L")
    return dict(schema_version=1, status="passed", name="old", recipe={}, recipe_sha256="0" * 64, fingerprint="f", environment=env,
                baseline=metrics, result=dict(metrics), output="./out", started_at="t", finished_at="t",
                wall_seconds=1.0)


def test_reports_written_before_still_read(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_old_report()))
    report = read_report(path)
    assert report.result.perplexity == 12.5 and report.result.invalid == {}
    assert report.environment.torch_threads is None and report.environment.cpu is None


def test_old_report_with_bare_nan_reads_as_invalid(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_old_report()).replace('"perplexity": 12.5', '"perplexity": NaN'))
    report = read_report(path)
    assert report.result.perplexity is None and "nan" in report.result.invalid["perplexity"]
    out = CliRunner().invoke(app, ["report", str(path)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "invalid" in out.output and "perplexity is nan" in out.output


# --- environment -------------------------------------------------------------------------------------------------


def test_environment_records_threads_and_cpu():
    env = environment_info(torch.device("cpu"))
    assert env.torch_threads == torch.get_num_threads() and env.torch_threads >= 1
    assert env.cpu and env.gpu is None and env.device.startswith("cpu (")
    assert Report.model_fields["environment"].annotation is type(env)


def test_cpu_model_parsing():
    info = "processor\t: 0\nvendor_id\t: X\nmodel name\t: Ryzen 9 7950X\n\nprocessor\t: 1\nmodel name\t: other\n"
    assert cpu_model(info, "x86_64") == "Ryzen 9 7950X"
    assert cpu_model("processor : 0\nBogoMIPS : 50\n", "aarch64") == "aarch64"
    assert cpu_model(None, "") == "unknown"


# --- interleaved latency -----------------------------------------------------------------------------------------


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeModel(torch.nn.Module):
    """Advances the fake clock by its own cost per call and logs (name, phase, prompt)."""

    def __init__(self, name, clock: FakeTime, log: list, prefill_costs, decode_cost=0.5, vocab=50):
        super().__init__()
        self.name, self.clock, self.log = name, clock, log
        self.prefill_costs, self.decode_cost = list(prefill_costs), decode_cost
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=64)
        self.prefills = 0

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        if past_key_values is None:
            self.log.append((self.name, "prefill", input_ids.tolist()))
            self.clock.now += self.prefill_costs[min(self.prefills, len(self.prefill_costs) - 1)]
            self.prefills += 1
        else:
            self.log.append((self.name, "decode", None))
            self.clock.now += self.decode_cost
        return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], 50), past_key_values=())


def test_pair_warms_up_then_alternates_on_the_same_prompt():
    clock, log = FakeTime(), []
    # A's first call is its warm-up (cost 9, never counted), then timed runs of 1, 1, 2 s
    a = FakeModel("A", clock, log, prefill_costs=[9.0, 1.0, 1.0, 2.0])
    b = FakeModel("B", clock, log, prefill_costs=[9.0, 1.0])
    energy = EnergyMeter("fake", clock)  # a shared counter of "joules" = fake seconds
    got = measure_latency_pair({"A": a, "B": b}, LAT, seed=3, meters={"A": energy, "B": None}, clock=clock)
    prefills = [(name, ids) for name, phase, ids in log if phase == "prefill"]
    assert [name for name, _ in prefills] == ["A", "B", "A", "B", "A", "B", "A", "B"]
    assert all(ids == prefills[0][1] for _, ids in prefills), "every run sees the same prompt"
    decodes = [name for name, phase, _ in log if phase == "decode"]
    assert decodes == ["A"] * 4 + ["B"] * 4 + (["A"] * 4 + ["B"] * 4) * 3
    assert got["A"].prefill_tokens_per_s == pytest.approx(8 / 1.0)
    assert got["A"].prefill_tokens_per_s_p90 == pytest.approx(8 / 1.8)
    assert got["A"].prefill_tokens_per_s_spread == pytest.approx((1.8 - 1.0) / 1.0)
    assert got["B"].prefill_tokens_per_s_spread == 0.0 and got["A"].decode_tokens_per_s_spread == 0.0
    assert got["A"].decode_tokens_per_s == pytest.approx(4 / 2.0)
    # energy: only A's own timed runs (1+2, 1+2, 2+2 s), not B's in between
    assert got["A"].energy_j_per_token == pytest.approx(10.0 / (3 * 12))
    assert got["B"].energy_j_per_token is None


def test_single_model_latency_has_a_spread():
    clock = FakeTime()
    model = FakeModel("A", clock, [], prefill_costs=[1.0, 1.0, 1.0, 3.0])
    lat = measure_latency(model, LAT, seed=0, clock=clock)
    assert lat.prefill_tokens_per_s_spread == pytest.approx((2.6 - 1.0) / 1.0)


def test_spread_definition():
    assert spread([2.0, 2.0, 2.0]) == 0.0
    assert spread([1.0, 2.0, 3.0]) == pytest.approx((2.8 - 1.2) / 2.0)
    assert spread([0.0, 0.0]) == 0.0 and spread([0.0, 0.0, 1.0]) == math.inf
    clock = FakeTime()
    one = measure_latency(FakeModel("A", clock, [], [1.0]), LAT.model_copy(update={"repeats": 1}), seed=0, clock=clock)
    assert one.decode_tokens_per_s_spread is None and one.prefill_tokens_per_s_spread is None


def test_remeasure_latency_on_two_models_and_merge(model_factory):
    path = model_factory("llama")
    baseline = load_model(str(path), "float32", torch.device("cpu"))
    result = load_model(str(path), "float32", torch.device("cpu"))
    cfg = EvaluateConfig(latency=LAT, energy=False)
    b, r = remeasure_latency(baseline, result, cfg, seed=0)
    assert b["latency_interleaved_with"] == "result" and r["latency_interleaved_with"] == "baseline"
    for values in (b, r):
        assert set(LatencyResult.__dataclass_fields__) <= set(values) and set(LATENCY_KEYS) <= set(values)
        assert values["decode_tokens_per_s"] > 0 and values["prefill_tokens_per_s"] > 0
        assert values["decode_tokens_per_s_spread"] >= 0 and values["prefill_tokens_per_s_spread"] >= 0
        assert values["energy_unavailable_reason"] == "disabled by evaluate.energy: false"
        assert values["invalid"] == {}
    stale = _metrics(perplexity=math.nan, decode_tokens_per_s=math.inf,
                     invalid={"perplexity": "perplexity is nan: x"})
    assert set(stale.invalid) == {"perplexity", "decode_tokens_per_s"}
    merged = with_latency(stale, r)
    assert merged.decode_tokens_per_s == r["decode_tokens_per_s"] and merged.latency_interleaved_with == "baseline"
    assert merged.invalid == {"perplexity": "perplexity is nan: x"}, "latency entries replaced, others kept"
    assert remeasure_latency(baseline, result, EvaluateConfig(), seed=0) == ({}, {})


# --- table -------------------------------------------------------------------------------------------------------


def test_table_shows_spread_and_warns_when_noisy():
    quiet = _metrics(decode_tokens_per_s=10.0, decode_tokens_per_s_spread=0.05, prefill_tokens_per_s_spread=0.2)
    noisy = _metrics(decode_tokens_per_s=11.0, decode_tokens_per_s_spread=0.35)
    calm = _text(metrics_table({"baseline": quiet, "result": quiet}))
    assert "decode spread" in calm and "5%" in calm and "timings noisy" not in calm
    loud = _text(metrics_table({"baseline": quiet, "result": noisy}))
    assert "35% !" in loud
    assert "timings noisy: spread > 20%; rerun on a quiet machine" in loud


def test_table_shows_invalid_and_keeps_user_text_literal():
    bad = _metrics(perplexity=math.nan)
    text = _text(metrics_table({"[bold]my/model[/bold]": bad}, title="run [red]x[/red]"))
    assert "[bold]my/model[/bold]" in text and "run [red]x[/red]" in text
    assert "invalid" in text and "perplexity is nan" in text


def test_table_notes_alternate_timing():
    b = _metrics(decode_tokens_per_s=10.0, latency_interleaved_with="result")
    r = _metrics(decode_tokens_per_s=12.0, latency_interleaved_with="baseline")
    assert "timed alternately" in _text(metrics_table({"baseline": b, "result": r}))


def test_compare_warns_when_machines_differ(tmp_path):
    one, two = _old_report(), _old_report()
    one["environment"].update(cpu="CPU A", torch_threads=2)
    two["environment"].update(cpu="CPU B", torch_threads=2)
    text = _text(compare_table(Report.model_validate(one), Report.model_validate(two)))
    assert "speeds not comparable: CPU CPU A (old) vs CPU B (old)" in text
    assert "torch threads" not in text
