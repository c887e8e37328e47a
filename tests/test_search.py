"""llmslim search on tiny models: grid expansion, validation, shared prefixes, ranking, the Pareto
front, resume, failures, outputs and the report/leaderboard commands."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

import llmslim.pipeline
from llmslim.cli import app
from llmslim.recipe.schema import ObjectiveConfig, SampleConfig
from llmslim.report import Metrics
from llmslim.search.objective import pareto_flags, relative, score
from llmslim.search.records import Relative
from llmslim.search.space import draw_trial, grid_trials

runner = CliRunner()

STEPS = "  - prune: {mlp: 0.25}\n  - rtn: {bits: 4, group_size: 32}"
GRID = """\
search:
  grid:
    steps.0.prune.mlp: [0.0, 0.25]
    steps.1.rtn.bits: [4, 8]
  objective: {perplexity_exponent: 1.5, time: decode, time_weight: 1.0, energy_weight: 0.0}
"""


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def search_recipe(model_factory, recipe_writer):
    def write(search: str = GRID, steps: str = STEPS, budgets: str = "", name: str = "sweep"):
        path = recipe_writer(model_factory("llama"), name=name, steps=steps, budgets=budgets,
                             output=f"./out/{name}")
        path.write_text(path.read_text().rstrip("\n") + "\n" + textwrap.dedent(search))
        return path
    return write


@pytest.fixture
def count_steps(monkeypatch):
    real, calls = llmslim.pipeline.run_step, []

    def counting(model, config, ctx):
        calls.append(config.model_dump())
        return real(model, config, ctx)

    monkeypatch.setattr(llmslim.pipeline, "run_step", counting)
    return calls


def test_grid_expands_every_combination_last_key_fastest():
    trials = grid_trials({"a": [1, 2], "b": ["x", "y", "z"]})
    assert trials == [{"a": a, "b": b} for a in (1, 2) for b in ("x", "y", "z")]


def test_score_follows_the_formula():
    obj = ObjectiveConfig(perplexity_exponent=1.5, time_weight=0.3, energy_weight=0.7)
    rel = Relative(perplexity=1.2, time=0.5, energy=0.8)
    assert score(rel, obj) == pytest.approx(1.2 ** 1.5 * (0.3 * 0.5 + 0.7 * 0.8))
    optional = ObjectiveConfig(time_weight=0.5, energy_weight=0.5, energy="optional")
    assert score(Relative(perplexity=1.1, time=0.9), optional) == pytest.approx(1.1 ** 1.5 * 0.9)
    assert score(Relative(perplexity=1.1, time=0.9), ObjectiveConfig(energy_weight=0.5)) is None
    assert score(Relative(perplexity=2.0), ObjectiveConfig(time_weight=0, perplexity_exponent=2)) == 4.0


def test_relative_time_is_seconds_per_token_over_the_original():
    def m(ppl, dec, pre=100.0, energy=None):
        return Metrics(perplexity=ppl, parameters=1, size_bytes=1, bits_per_parameter=8.0, device="cpu",
                       dtype="float32", decode_tokens_per_s=dec, prefill_tokens_per_s=pre, energy_j_per_token=energy)

    rel = relative(m(12.0, 50.0), m(10.0, 1.0), m(10.0, 25.0), "decode")
    assert rel.perplexity == pytest.approx(1.2) and rel.time == pytest.approx(0.5) and rel.energy is None


def test_pareto_flags_match_brute_force():
    import itertools
    import random

    rng = random.Random(1)
    points = [tuple(rng.choice([1, 2, 3]) for _ in range(3)) for _ in range(12)] + [None]
    flags = pareto_flags(points)
    for p, flag in zip(points, flags):
        dominated = p is not None and any(
            q is not None and all(a <= b for a, b in zip(q, p)) and q != p for q in points)
        assert flag == (p is not None and not dominated)
    assert pareto_flags([(1, None), (2, None)]) == [True, False], "an unmeasured coordinate is left out"
    assert list(itertools.compress(range(3), pareto_flags([(1, 2), (2, 1), (2, 2)]))) == [0, 1]


def test_sampled_trials_are_reproducible_and_distinct():
    sample = SampleConfig(space={"a": [1, 2, 3], "b": {"low": 0.0, "high": 1.0}}, trials=5, sampler="random")
    first = [draw_trial(sample, i, []) for i in range(3)]
    assert first == [draw_trial(sample, i, []) for i in range(3)]
    history = []
    for i in range(5):
        history.append((draw_trial(sample, i, history), None))
    assert len({json.dumps(t, sort_keys=True) for t, _ in history}) == 5


def test_search_shares_prefixes_ranks_and_publishes(search_recipe, workdir, count_steps):
    recipe = search_recipe()
    result = invoke("search", recipe)
    assert result.exit_code == 0, result.output
    assert result.output.index("4 trials") < result.output.index("[1/4]")
    out = workdir / "out" / "sweep"
    data = json.loads((out / "search.json").read_text())
    trials = data["trials"]
    assert [t["overrides"] for t in trials] == grid_trials({"steps.0.prune.mlp": [0.0, 0.25],
                                                            "steps.1.rtn.bits": [4, 8]})
    # mlp 0.0 means "skip the prune step": those trials quantize the original
    assert trials[0]["skipped_steps"] == [0] and trials[2]["skipped_steps"] == []
    # executions: rtn4, rtn8 (no prune), prune once, then rtn4 and rtn8 after it
    assert len(count_steps) == 5 and sum(1 for c in count_steps if "mlp" in c) == 1
    assert trials[3]["shared_steps"] == [0] and trials[2]["shared_steps"] == []
    assert data["steps_computed"] == 5 and data["steps_reused"] == 1
    for t in trials:
        rel = t["relative"]
        assert rel["perplexity"] == pytest.approx(t["metrics"]["perplexity"] / data["baseline"]["perplexity"])
        assert t["score"] == pytest.approx(rel["perplexity"] ** 1.5 * rel["time"])
        assert rel["energy"] is None and t["status"] == "passed" and t["wall_seconds"] > 0
    points = [(t["relative"]["perplexity"], t["relative"]["time"], t["metrics"]["size_bytes"]) for t in trials]
    assert [t["pareto"] for t in trials] == pareto_flags(points)
    best = min(trials, key=lambda t: t["score"])
    assert data["selected"] == [best["index"]] and best["selected"]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "passed" and (out / "model.safetensors").is_file()
    assert {"search.json", "search.md", "pareto.png"} <= set(report["files"])
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rank |" in (out / "search.md").read_text() and "pareto.png" in (out / "search.md").read_text()
    assert not (workdir / "out" / ".sweep.work").exists(), "the step store is removed once the search is done"
    count_steps.clear()
    again = invoke("search", recipe)
    assert again.exit_code == 0 and "up to date" in again.output and count_steps == []
    shown = invoke("report", out)
    assert shown.exit_code == 0 and "search sweep" in shown.output and "baseline" in shown.output



TWO = """\
search:
  grid:
    steps.1.rtn.bits: [4, 8]
  objective: {time_weight: 1.0, energy_weight: 0.0}
"""


def test_run_refuses_a_search_recipe(search_recipe):
    result = invoke("run", search_recipe(TWO))
    assert result.exit_code == 2 and "llmslim search" in result.output, result.output


def test_invalid_keys_and_values_are_located_before_anything_runs(search_recipe, workdir, count_steps):
    bad_key = TWO.replace("steps.1.rtn.bits", "steps.1.rtn.bitz")
    result = invoke("search", search_recipe(bad_key))
    assert result.exit_code == 2, result.output
    line = next(i for i, text in enumerate(search_recipe(bad_key).read_text().splitlines(), 1) if "bitz" in text)
    assert f"sweep.yaml:{line}: search.grid.steps.1.rtn.bitz:" in result.output
    assert "has no field 'bitz'" in result.output
    bad_value = TWO.replace("[4, 8]", "[4, 9]")
    result = invoke("search", search_recipe(bad_value))
    assert result.exit_code == 2 and f"sweep.yaml:{line}: search.grid.steps.1.rtn.bits: value 9" in result.output
    assert "trials" not in result.output and count_steps == [] and not (workdir / "out").exists()
    fixed = invoke("search", search_recipe(TWO.replace("steps.1.rtn.bits", "evaluate.latency.repeats")))
    assert fixed.exit_code == 2 and "cannot be varied by a search" in fixed.output


def test_energy_weight_needs_a_counter_unless_optional(search_recipe, monkeypatch, workdir):
    import llmslim.evaluate.energy as energy

    monkeypatch.setattr(energy, "open_energy_meter", lambda device: energy.EnergyMeter(None, reason="no RAPL"))
    weighted = TWO.replace("[4, 8]", "[4]").replace("energy_weight: 0.0", "energy_weight: 0.5")
    result = invoke("search", search_recipe(weighted))
    assert result.exit_code == 2 and "energy cannot be measured here (no RAPL)" in result.output, result.output
    assert "energy: optional" in result.output
    optional = weighted.replace("energy_weight: 0.5", "energy_weight: 0.5, energy: optional")
    result = invoke("search", search_recipe(optional))
    assert result.exit_code == 0, result.output
    data = json.loads((workdir / "out" / "sweep" / "search.json").read_text())
    assert "time only" in data["objective_note"]
    (trial,) = data["trials"]
    assert trial["relative"]["energy"] is None
    assert trial["score"] == pytest.approx(trial["relative"]["perplexity"] ** 1.5 * trial["relative"]["time"])


def test_a_killed_search_resumes_at_the_next_unfinished_trial(search_recipe, workdir, monkeypatch):
    recipe = search_recipe()
    real, calls = llmslim.pipeline.run_step, []

    def killed_at_third(model, config, ctx):
        calls.append(config.model_dump())
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, config, ctx)

    monkeypatch.setattr(llmslim.pipeline, "run_step", killed_at_third)
    result = runner.invoke(app, ["search", str(recipe)])
    assert result.exit_code == 130 and not (workdir / "out" / "sweep").exists(), result.output
    calls.clear()
    monkeypatch.setattr(llmslim.pipeline, "run_step", lambda m, c, x: (calls.append(c.model_dump()), real(m, c, x))[1])
    again = invoke("search", recipe)
    assert again.exit_code == 0, again.output
    assert again.output.count("recorded before") == 2, "the two finished trials are not rerun"
    assert len(calls) == 3, "the prune step, then the two quantizations after it"
    data = json.loads((workdir / "out" / "sweep" / "search.json").read_text())
    assert [t["status"] for t in data["trials"]] == ["passed"] * 4


def test_failed_trials_are_recorded_and_budgets_decide_the_exit(search_recipe, workdir, monkeypatch):
    real = llmslim.pipeline.run_step

    def eight_fails(model, config, ctx):
        if getattr(config, "bits", None) == 8:
            raise RuntimeError("injected failure")
        return real(model, config, ctx)

    monkeypatch.setattr(llmslim.pipeline, "run_step", eight_fails)
    result = invoke("search", search_recipe(TWO, budgets="  max_size_mb: 0.0001"))
    assert result.exit_code == 3, result.output
    data = json.loads((workdir / "out" / "sweep" / "search.json").read_text())
    four, eight = data["trials"]
    assert eight["status"] == "failed" and "injected failure" in eight["error"] and eight["score"] is None
    assert four["status"] == "budget_failed" and four["budgets"][0]["passed"] is False
    assert data["status"] == "budget_failed" and (workdir / "out" / "sweep" / "pareto.png").is_file()
    monkeypatch.setattr(llmslim.pipeline, "run_step", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    result = invoke("search", search_recipe(TWO, name="allfail"))
    assert result.exit_code == 1 and "every trial failed" in result.output, result.output


def test_pareto_selection_publishes_every_front_member_and_leaderboard(search_recipe, workdir):
    pareto = TWO.replace("[4, 8]", "[2, 8]") + "  select: pareto\n"
    assert invoke("search", search_recipe(pareto)).exit_code == 0
    out = workdir / "out" / "sweep"
    data = json.loads((out / "search.json").read_text())
    front = [t["index"] for t in data["trials"] if t["pareto"]]
    assert sorted(data["selected"]) == front
    for folder, index in data["front_folders"].items():
        member = json.loads((out / folder / "report.json").read_text())
        assert index in front and (out / folder / "model.safetensors").is_file() and member["status"] == "passed"
    single = search_recipe(TWO.replace("[4, 8]", "[4]"), name="single")
    assert invoke("search", single).exit_code == 0
    board = invoke("report", out, workdir / "out" / "single")
    assert board.exit_code == 0 and "leaderboard" in board.output and "#0" in board.output, board.output


def test_search_schema_is_in_sync():
    from pathlib import Path

    from llmslim.search.records import json_schema

    path = Path(__file__).resolve().parent.parent / "llmslim" / "schemas" / "search.schema.json"
    assert json.loads(path.read_text()) == json_schema(), "regenerate: python -m llmslim.search.records"


@pytest.mark.parametrize("step,skipped", [
    ({"gptq": {"bits": 0}}, True), ({"rtn": {"bits": 0}}, True), ({"awq": {"bits": 0}}, True),
    ({"signround": {"bits": 0, "iters": 10}}, True), ({"signround": {"bits": 2}}, False),
    ({"prune": {"heads": 0, "mlp": 0.0}}, True), ({"prune": {"mlp": 0.25}}, False),
    ({"distill": {"tokens": 0}}, True), ({"sparsify": {"sparsity": 0.0}}, False),
])
def test_skip_values_of_every_quantizing_step(step, skipped):
    from llmslim.search.plan import skipped_by

    assert skipped_by(step) is skipped
