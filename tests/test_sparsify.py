"""The sparsify step (issue 14): scores and masks on hand-made weights, N:M
groups, per-row sparsity, SparseGPT against magnitude on a synthetic layer,
located config errors, the dense checkpoint that reloads with its zeros, zeros
kept by a following gptq and distill, and iterative schedules (sparsify and
structured prune) that resume after an interruption with the result of an
uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from llmslim.errors import RecipeError
from llmslim.modeling import decoder_layers, find_linears, linear_weight, load_model
from llmslim.progress import Progress
from llmslim.quant import QuantSpec, accumulate_hessian, gptq_quantize_weight, make_empty_hessian
from llmslim.recipe import load_recipe
from llmslim.recipe.steps import GptqConfig, SparsifyConfig
from llmslim.sparse.masks import SPARSITY_MARKER, magnitude_scores, nm_mask, row_counts, unstructured_mask, wanda_scores
from llmslim.sparse.sparsegpt import sparsegpt_prune
from llmslim.steps.base import StepContext
from llmslim.steps.gptq import apply_gptq
from llmslim.steps.sparsify import DENSE_NOTE, SparsifyCompressor, apply_sparsify
from tests.test_cli import invoke

torch.set_num_threads(1)


def _synthetic(n=16, k=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, k)                       # input channels of very different sizes
    x = torch.randn(tokens, k, generator=g) * scale
    x[:, 1::2] += 0.8 * x[:, ::2]                          # correlated neighbours
    w = torch.randn(n, k, generator=g)
    h, _ = accumulate_hessian(make_empty_hessian(k), 0, x)
    return w, x, h


def _output_error(w, new, x):
    return ((x @ (w - new).t()).norm() / (x @ w.t()).norm()).item()


# -- pure math -------------------------------------------------------------------------------------------------------

def test_wanda_scores_on_a_hand_made_layer_match_a_direct_computation():
    w = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
    batches = [torch.tensor([[[1.0, 2.0, 0.0], [3.0, 4.0, 1.0]]]), torch.tensor([[[0.0, 1.0, 2.0]]])]
    norms = torch.tensor([(1 + 9 + 0) ** 0.5, (4 + 16 + 1) ** 0.5, (0 + 1 + 4) ** 0.5])
    expected = w.abs() * norms
    compressor = SparsifyCompressor(SparsifyConfig(method="wanda", sparsity=1 / 3), torch.device("cpu"))
    for x in batches:                                      # as the calibration loop hands them over
        compressor.collect("l", None, x)
    torch.testing.assert_close(wanda_scores(w, compressor.sq_sums["l"]), expected)
    # the lowest score of each row goes: row 0 -> column 2 (0.5*sqrt5), row 1 -> column 1 (0.25*sqrt21)
    layer = torch.nn.Linear(3, 2, bias=False)
    layer.weight.data.copy_(w)
    stats = compressor.compress(0, "l", layer)
    assert torch.equal(layer.weight.data == 0, torch.tensor([[False, False, True], [False, True, False]]))
    assert stats["zeros"] == 2 and stats["sparsity"] == pytest.approx(1 / 3, rel=1e-5)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_the_nm_pattern_holds_exactly_in_every_group(n, m):
    w, _, h = _synthetic(k=64)
    masks = {"magnitude": nm_mask(magnitude_scores(w), n, m),
             "sparsegpt": sparsegpt_prune(w, h, pattern=(n, m), block_size=24)[1]}
    new = sparsegpt_prune(w, h, pattern=(n, m), block_size=24)[0]
    for name, mask in masks.items():
        removed = mask.reshape(w.shape[0], -1, m).sum(-1)
        assert torch.equal(removed, torch.full_like(removed, m - n)), name
    kept = (new != 0).reshape(w.shape[0], -1, m).sum(-1)
    assert torch.equal(kept, torch.full_like(kept, n))
    with pytest.raises(ValueError, match="not a multiple of M = 8"):
        nm_mask(magnitude_scores(w[:, :60]), 4, 8)


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.77])
def test_every_row_loses_the_requested_fraction(sparsity):
    w, _, h = _synthetic(k=100)   # 100 columns: partial last block of 32
    count = round(sparsity * 100)
    assert sum(row_counts(100, sparsity, a, min(a + 32, 100)) for a in range(0, 100, 32)) == count
    for mask in (unstructured_mask(magnitude_scores(w), count),
                 sparsegpt_prune(w, h, sparsity=sparsity, block_size=32)[1]):
        assert torch.equal(mask.sum(1), torch.full((w.shape[0],), count))
    forced = torch.zeros_like(w, dtype=torch.bool)
    forced[:, :10] = True                      # an earlier round's zeros are taken first
    assert unstructured_mask(magnitude_scores(w), count, forced)[:, :10].all()


def test_sparsegpt_lowers_the_layer_output_error_against_magnitude_and_wanda():
    w, x, h = _synthetic()
    magnitude = w.masked_fill(unstructured_mask(magnitude_scores(w), 32), 0)
    wanda = w.masked_fill(unstructured_mask(wanda_scores(w, x.square().sum(0)), 32), 0)
    sparse, mask, _ = sparsegpt_prune(w, h, sparsity=0.5)
    errors = {name: _output_error(w, new, x) for name, new in
              {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparse}.items()}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert torch.equal(sparse == 0, mask)


@pytest.mark.parametrize("sym,act_order,static", [(True, True, True), (False, True, False), (False, False, False)])
def test_gptq_keeps_pruned_weights_exactly_zero(sym, act_order, static):
    w, _, h = _synthetic(k=64)
    sparse, mask, _ = sparsegpt_prune(w, h, pattern=(2, 4))
    spec = QuantSpec(bits=3, group_size=16, sym=sym, scale_search="mse")
    qw, _ = gptq_quantize_weight(sparse, h, spec, block_size=32, act_order=act_order, static_groups=static,
                                 pruned=sparse == 0)
    deq = qw.dequantize()
    assert torch.equal(deq[mask], torch.zeros(int(mask.sum())))
    zeros_per_col = qw.zeros[qw.g_idx.long()].t()         # [N, K] zero point of each weight's group
    assert torch.equal(qw.codes[mask].long(), zeros_per_col[mask].long())
    plain, _ = gptq_quantize_weight(sparse, h, spec, block_size=32, act_order=act_order, static_groups=static)
    assert (plain.dequantize()[mask] != 0).any()          # without the mask GPTQ fills them in


# -- the step ---------------------------------------------------------------------------------------------------------

def _ctx(model, samples=4, seqlen=32):
    ids = torch.randint(0, model.config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    return StepContext(tokenizer=None, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                       calibration=ids)


def _decoder_weights(model):
    return {n: linear_weight(m).clone() for n, m in find_linears(decoder_layers(model)).items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "taylor"])
def test_each_method_gives_the_requested_sparsity_and_pattern(model_factory, method):
    model = load_model(str(model_factory("llama")), "float32")
    outcome = apply_sparsify(model, SparsifyConfig(method=method, pattern="2:4"), _ctx(model))
    for name, w in _decoder_weights(model).items():
        kept = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(kept.max()) <= 2 and (kept == 2).float().mean() > 0.99, name
    assert outcome.changed["sparsity"] == pytest.approx(0.5, abs=1e-3)
    model = load_model(str(model_factory("llama")), "float32")
    outcome = apply_sparsify(model, SparsifyConfig(method=method, sparsity=0.3, ignore=["*.v_proj"]), _ctx(model))
    for name, w in _decoder_weights(model).items():
        zeros = (w == 0).sum(1)
        expected = 0 if name.endswith("v_proj") else round(0.3 * w.shape[1])
        assert int(zeros.min()) >= expected and (zeros == expected).float().mean() > 0.99, name
    assert len(outcome.changed["sparsity_per_layer"]) == 2 and outcome.changed["modules_sparsified"] == 12
    modules = [r["module"] for r in outcome.layers]
    assert len(modules) == 12 and not any(m.endswith("v_proj") for m in modules) and modules[0].startswith("model.")
    assert getattr(model.config, SPARSITY_MARKER)["method"] == method


def test_gpt2_conv1d_and_a_width_the_pattern_cannot_take(model_factory):
    from llmslim.errors import StepError

    model = load_model(str(model_factory("gpt2")), "float32")
    apply_sparsify(model, SparsifyConfig(method="sparsegpt", sparsity=0.5), _ctx(model))
    w = linear_weight(model.transformer.h[0].mlp.c_proj)
    assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), w.shape[1] // 2))
    with pytest.raises(StepError, match=r"pattern needs input widths that are multiples of 7"):
        apply_sparsify(model, SparsifyConfig(method="magnitude", pattern="3:7"), _ctx(model))


def test_sparsify_then_gptq_keeps_the_zeros(model_factory):
    model = load_model(str(model_factory("llama")), "float32")
    ctx = _ctx(model)
    apply_sparsify(model, SparsifyConfig(method="wanda", pattern="2:4"), ctx)
    before = _decoder_weights(model)
    outcome = apply_gptq(model, GptqConfig(bits=4, group_size=32, sym=False, format="dense"), ctx)
    after = _decoder_weights(model)
    for name, w in before.items():
        assert torch.equal(after[name] == 0, w == 0) or bool((after[name][w == 0] == 0).all()), name
        assert not torch.equal(after[name], w)            # it did quantize
    assert "sparsity_kept" in outcome.changed


# -- recipes -----------------------------------------------------------------------------------------------------------

def _sparsify_recipe(workdir, model, body: str, name="sparse", output=None):
    """A recipe whose only step is sparsify; its options start on line 9."""
    lines = ["version: 1", f"name: {name}", f"model: {model}", "dtype: float32", "device: cpu",
             "calibration: {dataset: text:./data/train.txt, samples: 4, seqlen: 32}", "steps:"]
    lines += [line for line in body.splitlines()]
    lines += ["evaluate:", "  perplexity: {dataset: text:./data/test.txt, seqlen: 32}", f"output: {output or './out/' + name}"]
    path = workdir / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_located_errors_for_bad_options(workdir, model_factory):
    model = model_factory("llama")
    cases = {"pattern: '4:4'": "N:M needs 1 <= N < M", "pattern: 'x'": "expected N:M such as",
             "sparsity: 1.0": "less than 1", "sparsity: -0.1": "greater than or equal to 0",
             "{}": "give exactly one of `sparsity`", "sparsity: 0.5\n      pattern: '2:4'": "give exactly one",
             "sparsity: 0.5\n      rounds: 3": "needs a `recover:` distill block",
             "sparsity: 0.5\n      method: obs": "wanda"}
    for body, message in cases.items():
        opts = body if body == "{}" else "\n      " + body
        path = _sparsify_recipe(workdir, model, f"  - sparsify: {opts}" if body == "{}" else f"  - sparsify:{opts}")
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        text = str(info.value)
        assert message in text and "sparse.yaml:" in text and "steps[0].sparsify" in text, (body, text)
    result = invoke("validate", _sparsify_recipe(workdir, model, "  - sparsify: {pattern: '2:4:8'}"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    path = _sparsify_recipe(workdir, model, "  - sparsify:\n      sparsity: 0.5\n      rounds: 2\n      recover:\n"
                                            "        dataset: text:./data/missing.txt")
    with pytest.raises(RecipeError, match=r"sparse.yaml:12: steps\[0\].sparsify.recover.dataset: file not found"):
        load_recipe(path)


def test_the_checkpoint_stays_dense_and_reloads_with_its_zeros(workdir, model_factory):
    path = _sparsify_recipe(workdir, model_factory("llama"), "  - sparsify: {method: wanda, sparsity: 0.5}")
    result = invoke("run", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    changed = report["steps"][0]["changed"]
    assert changed["sparsity"] == pytest.approx(0.5) and changed["note"] == DENSE_NOTE
    assert "no faster" in changed["note"] and len(changed["sparsity_per_layer"]) == 2
    assert report["result"]["size_bytes"] == report["baseline"]["size_bytes"]
    assert report["result"]["parameters"] == report["baseline"]["parameters"]
    model = load_model(str(workdir / "out" / "sparse"))
    for name, w in _decoder_weights(model).items():
        assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), w.shape[1] // 2)), name
    assert getattr(model.config, SPARSITY_MARKER)["sparsity"] == pytest.approx(0.5)


def test_zeros_survive_a_packed_gptq_and_a_distill(workdir, model_factory):
    model = model_factory("llama")
    first = "  - sparsify: {method: magnitude, pattern: '2:4'}\n"
    distill = ("  - distill: {dataset: text:./data/train.txt, tokens: 512, seqlen: 32, batch_size: 4, lr: 3e-3, "
               "eval_every: 0}\n")
    runs = {"only": first, "distilled": first + distill,
            "packed": first + distill + "  - gptq: {bits: 4, group_size: 32, sym: false}"}
    for name, steps in runs.items():
        assert invoke("run", _sparsify_recipe(workdir, model, steps.rstrip("\n"), name=name)).exit_code == 0, name
    only = _decoder_weights(load_model(str(workdir / "out" / "only")))
    distilled = _decoder_weights(load_model(str(workdir / "out" / "distilled")))
    packed = load_model(str(workdir / "out" / "packed"))
    for name, w in only.items():
        assert torch.equal(distilled[name] == 0, w == 0), name
        assert not torch.equal(distilled[name], w)
        deq = decoder_layers(packed).get_submodule(name).dequantize_weight()
        assert bool((deq[w == 0] == 0).all()), name
    report = json.loads((workdir / "out" / "distilled" / "report.json").read_text())
    assert "sparsity_kept" in report["steps"][1]["changed"]


# -- iterative schedules ------------------------------------------------------------------------------------------

RECOVER = ("      recover: {dataset: text:./data/train.txt, tokens: 256, seqlen: 32, batch_size: 4, lr: 3e-3, "
           "eval_every: 0, checkpoint_every: 1}")


def _interrupt_second_recovery(monkeypatch):
    from llmslim.distill.trainer import Distiller

    original_run, calls = Distiller.run, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 2:
            self.callback = lambda step, d: d.request_stop() if step == 1 else None
        return original_run(self)

    monkeypatch.setattr(Distiller, "run", interrupted)
    return original_run


@pytest.mark.parametrize("step", [
    "  - sparsify:\n      method: wanda\n      pattern: '2:4'\n      rounds: 3\n" + RECOVER,
    "  - prune:\n      heads: 0.5\n      mlp: 0.5\n      rounds: 2\n" + RECOVER,
])
def test_a_schedule_killed_mid_way_resumes_with_the_result_of_an_uninterrupted_run(workdir, model_factory,
                                                                                    monkeypatch, step):
    from llmslim.distill.trainer import Distiller
    from llmslim.pipeline import run_recipe

    model = model_factory("llama")
    straight = run_recipe(load_recipe(_sparsify_recipe(workdir, model, step, name="straight")))
    assert straight.report.status == "passed", straight.report.error
    recipe = load_recipe(_sparsify_recipe(workdir, model, step, name="resumed"))
    original_run = _interrupt_second_recovery(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    monkeypatch.setattr(Distiller, "run", original_run)
    resumed = run_recipe(recipe)
    assert resumed.report.status == "passed", resumed.report.error
    a = load_model(str(workdir / "out" / "straight")).state_dict()
    b = load_model(str(workdir / "out" / "resumed")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rounds = [{k: v for k, v in r.items() if k != "recover"} for r in resumed.report.steps[0].changed["rounds"]]
    assert rounds == [{k: v for k, v in r.items() if k != "recover"} for r in straight.report.steps[0].changed["rounds"]]
    assert len(rounds) == (3 if "sparsify" in step else 2)
    recovered = [r["recover"] for r in resumed.report.steps[0].changed["rounds"]]
    assert [r["resumed_from_step"] for r in recovered] == [None, 2] + [None] * (len(rounds) - 2)
    if "sparsify" in step:
        assert [r["target"] for r in rounds] == [pytest.approx(1 / 6), pytest.approx(1 / 3), "2:4"]
        for w in _decoder_weights(load_model(str(workdir / "out" / "resumed"))).values():
            assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2
    else:
        config = load_model(str(workdir / "out" / "resumed")).config
        assert config.num_attention_heads == 2 and config.intermediate_size == 64
