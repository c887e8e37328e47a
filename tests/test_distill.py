"""The distill step: loss functions on hand-made logits, training lowers the
KL to the teacher, an interrupted run resumes to the same weights, a 2-process
gloo run (DDP and FSDP) gives the same weights on both ranks, located config
errors, and the step inside a recipe."""

from __future__ import annotations

import json
import math
import os
import socket
import textwrap

import pytest
import torch
import torch.nn.functional as F

from llmslim.distill.losses import distillation_loss, forward_kl, hidden_cosine, next_token_ce, reverse_kl
from llmslim.distill.data import SampleOrder, build_data, lr_factor
from llmslim.distill.trainer import STATE_FILE, Distiller
from llmslim.errors import RecipeError
from llmslim.modeling import load_model, load_tokenizer
from llmslim.recipe import load_recipe
from llmslim.recipe.steps import DistillConfig
from tests.conftest import CORPUS, build_model

torch.set_num_threads(1)


# -- losses --------------------------------------------------------------------------------------------------------

def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(2, 5, 11)
    for fn in (forward_kl, reverse_kl):
        for temperature in (0.5, 1.0, 3.0):
            assert fn(logits, logits.clone(), temperature).abs().item() < 1e-6
    assert forward_kl(logits, logits + 7.0).abs().item() < 1e-5  # a constant shift is the same distribution


def test_kl_by_hand_and_temperature_scaling():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert forward_kl(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert reverse_kl(student, teacher, 1.0).item() == pytest.approx(
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-6)
    # T = 2: logits halved (p_t = (sqrt 3, 1) / (sqrt 3 + 1)), and the KL multiplied by T^2 = 4
    a = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    soft = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    assert forward_kl(student, teacher, 2.0).item() == pytest.approx(4 * soft, rel=1e-6)
    # against torch's own KL on random logits
    s, t = torch.randn(3, 4, 9), torch.randn(3, 4, 9)
    ref = F.kl_div(F.log_softmax(s / 1.5, -1), F.log_softmax(t / 1.5, -1), log_target=True,
                   reduction="sum") / 12 * 1.5 ** 2
    assert forward_kl(s, t, 1.5).item() == pytest.approx(ref.item(), rel=1e-5)


def test_padding_positions_are_masked():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 7), torch.randn(2, 6, 7)
    ids = torch.randint(0, 7, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    s_garbage, t_garbage, ids_garbage = s.clone(), t.clone(), ids.clone()
    s_garbage[0, 4:] = 100 * torch.randn(2, 7)
    t_garbage[0, 4:] = -50 * torch.randn(2, 7)
    ids_garbage[0, 4:] = 3
    for fn in (forward_kl, reverse_kl):
        masked = fn(s_garbage, t_garbage, 2.0, mask)
        kept = fn(torch.cat([s[0, :4], s[1]]), torch.cat([t[0, :4], t[1]]), 2.0)
        assert masked.item() == pytest.approx(kept.item(), rel=1e-5)
    ce = next_token_ce(s_garbage, ids_garbage, mask)
    ref = torch.cat([F.cross_entropy(s[0, :3], ids[0, 1:4], reduction="none"),
                     F.cross_entropy(s[1, :5], ids[1, 1:], reduction="none")]).mean()
    assert ce.item() == pytest.approx(ref.item(), rel=1e-5)
    assert next_token_ce(s, ids).item() == pytest.approx(
        F.cross_entropy(s[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1)).item(), rel=1e-5)


def test_loss_mix_and_hidden_cosine():
    torch.manual_seed(1)
    s, t, ids = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randint(0, 8, (2, 5))
    h = torch.randn(2, 5, 4)
    assert hidden_cosine([h], [2 * h]).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_cosine([h], [-h]).item() == pytest.approx(2.0, abs=1e-6)
    total, parts = distillation_loss({"kl": 1.0, "ce": 0.5}, s, ids, teacher_logits=t, temperature=2.0,
                                     hidden_weight=0.25, student_states=[h], teacher_states=[-h])
    expected = forward_kl(s, t, 2.0) + 0.5 * next_token_ce(s, ids) + 0.25 * 2.0
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(parts) == {"kl", "ce", "hidden_cosine"}
    total, parts = distillation_loss({"ce": 1.0}, s, ids)  # no teacher needed
    assert total.item() == pytest.approx(next_token_ce(s, ids).item())
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss({"reverse_kl": 1.0}, s, ids)


def test_schedule_and_sample_order():
    factors = [lr_factor(s, 10, 2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] < 0.05
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    order = SampleOrder(5, seed=3)
    first = order.indices(0, 10)
    assert sorted(first[:5].tolist()) == list(range(5)) and sorted(first[5:].tolist()) == list(range(5))
    assert torch.equal(SampleOrder(5, seed=3).indices(7, 3), first[7:10])
    assert not torch.equal(SampleOrder(5, seed=4).indices(0, 10), first)


# -- training ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A teacher with peaked predictions (its lm_head scaled up) and a differently initialised student."""
    root = tmp_path_factory.mktemp("distill-pair")
    teacher = build_model("llama", root / "teacher", seed=0)
    model = load_model(str(teacher))
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(teacher)
    build_model("llama", root / "student", seed=1)
    (root / "train.txt").write_text("\n\n".join(CORPUS) + "\n")
    return root


def _config(root, **kw) -> DistillConfig:
    base = dict(dataset=f"text:{root / 'train.txt'}", tokens=4 * 32 * 6, seqlen=32, batch_size=4, micro_batch_size=2,
                lr=3e-3, warmup=0.2, eval_every=3, eval_windows=4, checkpoint_every=2)
    return DistillConfig(**{**base, **kw})


def _run(root, config, scratch=None, callback=None, student=None):
    tokenizer = load_tokenizer(str(root / "teacher"))
    student = student or load_model(str(root / "student"), "float32", "cpu")
    teacher = load_model(str(root / "teacher"), "float32", "cpu") if config.needs_teacher else None
    distiller = Distiller(student, config, build_data(config, tokenizer), teacher=teacher, seed=0, scratch=scratch,
                          callback=callback)
    return student, teacher, distiller


@torch.no_grad()
def _kl_to_teacher(student, teacher, windows):
    return forward_kl(student(windows).logits, teacher(windows).logits, 1.0).item()


def test_a_few_steps_lower_the_kl_to_the_teacher(pair):
    config = _config(pair, tokens=4 * 32 * 10, eval_every=0)
    student, teacher, distiller = _run(pair, config)
    windows = distiller.data.evaluation
    before = _kl_to_teacher(student, teacher, windows)
    result = distiller.run()
    after = _kl_to_teacher(student, teacher, windows)
    assert after < 0.8 * before
    assert result.perplexity_after < result.perplexity_before
    assert result.steps == 10 and result.tokens == 10 * 4 * 32 and result.tokens_per_s > 0
    losses = [p["loss"] for p in result.curves["loss"]]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert [p["step"] for p in result.curves["eval_perplexity"]] == [0, 10]
    assert not student.training and all(p.grad is None for p in student.parameters())


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_an_interruption_gives_the_same_weights(pair, tmp_path):
    config = _config(pair)
    reference, _, distiller = _run(pair, config, scratch=tmp_path / "straight")
    straight = distiller.run()
    expected = _weights(reference)

    # a stop request (what SIGINT/SIGTERM make) during step 4: the step completes, is checkpointed, then
    # KeyboardInterrupt
    def stop_at_3(step, d):
        if step == 3:
            d.request_stop()

    _, _, distiller = _run(pair, config, scratch=tmp_path / "stopped", callback=stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        distiller.run()
    assert torch.load(tmp_path / "stopped" / STATE_FILE, weights_only=True)["progress"]["step"] == 4

    # a hard crash after step 5: the last checkpoint (step 4, checkpoint_every=2) is what survives
    def crash_at_5(step, d):
        if step == 5:
            raise RuntimeError("simulated crash")

    _, _, distiller = _run(pair, config, scratch=tmp_path / "stopped", callback=crash_at_5)
    with pytest.raises(RuntimeError, match="simulated"):
        distiller.run()
    assert distiller.student.training is False  # cleaned up on the way out

    student, _, distiller = _run(pair, config, scratch=tmp_path / "stopped")
    resumed = distiller.run()
    assert resumed.resumed_from_step == 4
    for name, value in _weights(student).items():
        assert torch.equal(value, expected[name]), name
    assert resumed.curves == straight.curves
    assert resumed.perplexity_after == straight.perplexity_after

    # a checkpoint of another config is not used
    other = _config(pair, lr=1e-3)
    _, _, distiller = _run(pair, other, scratch=tmp_path / "stopped")
    assert distiller.run().resumed_from_step is None


def test_ce_only_needs_no_teacher_and_bf16_student_keeps_its_dtype(pair):
    config = _config(pair, loss="ce", eval_every=0, tokens=4 * 32 * 2)
    student = load_model(str(pair / "student"), "bfloat16", "cpu")
    _, teacher, distiller = _run(pair, config, student=student)
    assert teacher is None
    before = _weights(student)
    result = distiller.run()
    assert result.teacher_perplexity is None
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_mixed_loss_hidden_states_checkpointing_and_bf16_autocast(pair):
    config = _config(pair, loss={"kl": 1.0, "ce": 0.5}, hidden_states=0.5, grad_checkpointing=True, autocast="bf16",
                     weight_decay=0.1, tokens=4 * 32 * 2, eval_every=0)
    student, _, distiller = _run(pair, config)
    result = distiller.run()
    point = result.curves["loss"][-1]
    assert {"loss", "kl", "ce", "hidden_cosine", "lr", "grad_norm"} <= set(point)
    assert point["loss"] == pytest.approx(point["kl"] + 0.5 * point["ce"] + 0.5 * point["hidden_cosine"], rel=1e-5)
    assert result.autocast == "bfloat16"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in student.modules())
    assert all(p.dtype == torch.float32 for p in student.parameters())


# -- data parallel -------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """One rank of the 2-process test (spawned): DDP, then FSDP with an interruption and a resume."""
    import pathlib

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from llmslim.distill.distributed import init_distributed

    assert init_distributed() == (rank, world_size)
    root, out = pathlib.Path(root), pathlib.Path(out)
    results = {}
    for mode in ("ddp", "fsdp"):
        config = _config(root, parallel=mode, eval_every=2)
        if mode == "fsdp":
            def stop_at_2(step, d):
                if step == 2 and rank == 1:  # one rank's signal stops both after the same step (3)
                    d.request_stop()

            _, _, distiller = _run(root, config, scratch=out / mode, callback=stop_at_2)
            try:
                distiller.run()
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("the stop request was not honoured")
        student, _, distiller = _run(root, config, scratch=out / mode)
        result = distiller.run()
        results[mode] = {"ppl": result.perplexity_after, "resumed": result.resumed_from_step,
                         "parallel": result.parallel, "world": result.world_size}
        torch.save(_weights(student), out / f"{mode}-rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_process_gloo_run_gives_rank_consistent_weights(pair, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, _free_port(), str(pair), str(tmp_path)), nprocs=2, join=True)
    single, _, distiller = _run(pair, _config(pair, eval_every=2))
    distiller.run()
    for mode in ("ddp", "fsdp"):
        r0 = torch.load(tmp_path / f"{mode}-rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{mode}-rank1.pt", weights_only=True)
        for name in r0:
            assert torch.equal(r0[name], r1[name]), (mode, name)
            # the same global batches as one process: equal up to float summation order
            torch.testing.assert_close(r0[name], single.state_dict()[name], rtol=1e-3, atol=1e-4)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0] == info[1]
    assert info[0]["ddp"]["parallel"] == "ddp" and info[0]["ddp"]["world"] == 2
    assert info[0]["fsdp"]["resumed"] == 3 and info[0]["fsdp"]["parallel"] == "fsdp"


# -- recipes -------------------------------------------------------------------------------------------------------

def _distill_recipe(workdir, model, body: str):
    """A recipe whose only step is distill; its options start on line 8."""
    lines = ["version: 1", "name: distill-test", f"model: {model}", "dtype: float32", "device: cpu", "steps:",
             "  - distill:"]
    lines += ["      " + line for line in textwrap.dedent(body).splitlines()]
    lines += ["evaluate:", "  perplexity: {dataset: text:./data/test.txt, seqlen: 32}", "output: ./out/distill-test"]
    path = workdir / "distill.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_recipe_paths_underscored_tokens_and_located_errors(workdir, model_factory):
    model = model_factory("llama")
    good = _distill_recipe(workdir, model, """\
        dataset: text:./data/train.txt
        tokens: 2_000_000
        lr: 3e-4
        autocast: off
        loss: {kl: 1.0, ce: 0.5}
        """)
    step = load_recipe(good).steps[0]
    assert step.tokens == 2_000_000 and step.lr == pytest.approx(3e-4) and step.autocast == "off"
    assert step.dataset == f"text:{(workdir / 'data' / 'train.txt').resolve()}"
    assert step.loss_weights == {"kl": 1.0, "ce": 0.5} and step.teacher == "original"

    bad = _distill_recipe(workdir, model, """\
        dataset: text:./data/missing.txt
        teacher: ./no-such-teacher
        batch_size: 16
        micro_batch_size: 5
        loss: {kl: 1.0, mse: 0.5}
        temperature: 0
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    text = {p.field: (p.line, p.message) for p in info.value.problems}
    assert text["steps[0].distill.loss"][0] == 12 and "unknown loss 'mse'" in text["steps[0].distill.loss"][1]
    assert text["steps[0].distill.temperature"][0] == 13
    bad = _distill_recipe(workdir, model, "dataset: text:./data/train.txt\nbatch_size: 16\nmicro_batch_size: 5\n")
    with pytest.raises(RecipeError, match=r"distill.yaml:7: steps\[0\].distill: micro_batch_size 5 does not divide"):
        load_recipe(bad)

    # datasets and the teacher are checked once the options are valid
    bad = _distill_recipe(workdir, model, """\
        dataset: text:./data/missing.txt
        teacher: ./no-such-teacher
        eval_dataset: jsonl:./data/x.jsonl#text
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    text = {p.field: (p.line, p.message) for p in info.value.problems}
    assert text["steps[0].distill.dataset"] == (8, f"file not found: {(workdir / 'data/missing.txt').resolve()}")
    assert text["steps[0].distill.teacher"][0] == 9 and "teacher folder not found" in text["steps[0].distill.teacher"][1]
    assert text["steps[0].distill.eval_dataset"][0] == 10

    bad = _distill_recipe(workdir, model, "tokens: 1000\n")
    with pytest.raises(RecipeError, match="distill.dataset: required field is missing"):
        load_recipe(bad)


def test_prune_then_distill_in_a_recipe(workdir, model_factory, recipe_writer):
    from llmslim.pipeline import run_recipe
    from llmslim.recipe.steps import STEP_CONFIGS

    model = model_factory("llama")
    prune = "  - prune: {heads: 0.5, mlp: 0.25, importance: magnitude}\n" if "prune" in STEP_CONFIGS else ""
    steps = (prune + "  - distill: {dataset: text:./data/train.txt, tokens: 1024, seqlen: 32, batch_size: 4, "
             "lr: 3e-3, eval_every: 4, checkpoint_every: 2}")
    recipe = load_recipe(recipe_writer(model, name="prune-distill", steps=steps, output="./out/pd"))
    outcome = run_recipe(recipe)
    assert outcome.report.status == "passed", outcome.report.error
    record = outcome.report.steps[-1]
    assert record.name == "distill"
    changed = record.changed
    assert changed["steps"] == 8 and changed["tokens"] == 1024 and changed["teacher"] == "original"
    assert all(math.isfinite(changed[k]) for k in ("perplexity_before", "perplexity_after", "tokens_per_s"))
    assert [p["step"] for p in changed["curves"]["eval_perplexity"]] == [0, 4, 8]
    assert len(changed["curves"]["loss"]) == 8
    assert load_model(str(workdir / "out" / "pd")).config.num_attention_heads == (2 if prune else 4)


def test_sigint_stops_after_the_step_with_a_checkpoint(pair, tmp_path):
    import signal

    before = signal.getsignal(signal.SIGINT)

    def interrupt_at_2(step, d):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    _, _, distiller = _run(pair, _config(pair, checkpoint_every=100), scratch=tmp_path, callback=interrupt_at_2)
    with pytest.raises(KeyboardInterrupt, match="run again to resume"):
        distiller.run()
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["progress"]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupted_recipe_resumes_mid_distillation(workdir, model_factory, monkeypatch):
    from llmslim.pipeline import run_recipe

    model = model_factory("llama")
    body = ("dataset: text:./data/train.txt\ntokens: 768\nseqlen: 32\nbatch_size: 4\nmicro_batch_size: 2\n"
            "lr: 3e-3\neval_every: 2\ncheckpoint_every: 2\n")
    straight = run_recipe(load_recipe(_distill_recipe(workdir, model, body), output=workdir / "out" / "straight"))
    assert straight.report.status == "passed", straight.report.error

    recipe = load_recipe(_distill_recipe(workdir, model, body), output=workdir / "out" / "resumed")
    original_run = Distiller.run

    def interrupted_run(self):
        self.callback = lambda step, d: d.request_stop() if step == 2 else None
        return original_run(self)

    monkeypatch.setattr(Distiller, "run", interrupted_run)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    monkeypatch.setattr(Distiller, "run", original_run)
    resumed = run_recipe(recipe)
    assert resumed.report.status == "passed", resumed.report.error
    changed = resumed.report.steps[0].changed
    assert changed["resumed_from_step"] == 3
    assert changed["curves"] == straight.report.steps[0].changed["curves"]
    a = load_model(str(workdir / "out" / "straight")).state_dict()
    b = load_model(str(workdir / "out" / "resumed")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((workdir / "out").glob(".resumed.work/*/step-0.scratch"))
