"""``llmslim run`` with a ``parallel: fsdp`` distill step under torchrun on
two CPU processes (gloo) really shards: the student and the teacher are
replicas built on meta and filled from rank 0, no model or tensor is
deep-copied, rank 1 holds only its shards while it trains, only rank 0
writes (training checkpoints, the published model), and the result equals
a single-process run of the same global batches.

This file is also the program each rank runs (``python -m torch.distributed.run
... tests/test_fsdp.py RECIPE OUT``): the CLI, instrumented by ``_instrument``."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmslim.modeling import load_model, load_tokenizer
from tests.conftest import build_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")

# Same global batches, same windows per micro-batch: the runs may differ only in the order of float32 sums
# (the half batches' gradients reduced across ranks instead of accumulated in one process, the gradient
# norm summed shard by shard): ~1e-7 relative per step, passed on by AdamW scaled by lr (3e-3) over 4
# steps. Measured here: bit-identical. The bound leaves room for other BLAS blockings yet stays 1/100 of
# what training moves the weights (asserted).
RTOL, ATOL = 1e-4, 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-pair")
    build_model("llama", root / "teacher", seed=0)
    build_model("llama", root / "student", seed=1)
    return root


def test_the_replica_matches_the_model_or_the_step_says_why(model_factory):
    from llmslim.distill.sharding import park, replica_on_meta, structure_problem

    model = load_model(str(model_factory("gpt2")), "bfloat16")
    replica = replica_on_meta(model, torch.float32)
    assert structure_problem(model, replica, "student") is None
    assert model.config.dtype == torch.bfloat16  # rebuilding does not rewrite the caller's config
    assert {p.dtype for p in replica.parameters()} == {torch.float32} and all(p.is_meta for p in replica.parameters())
    # a module the config does not describe (changed behind the config's back) is refused, by name
    model.transformer.h[1].mlp.c_fc = torch.nn.Linear(64, 200)
    problem = structure_problem(model, replica_on_meta(model, torch.float32), "student")
    assert "transformer.h.1.mlp.c_fc.weight" in problem and "parallel: ddp" in problem
    # parking keeps the Parameter objects, so tied weights stay tied, and meta frees them
    wte = model.transformer.wte.weight
    park(model, torch.device("meta"))
    assert model.transformer.wte.weight is wte is model.lm_head.weight and wte.is_meta
    assert wte.dtype == torch.bfloat16


def _local_numel(module) -> int:
    return sum(p.to_local().numel() for p in module.parameters())


def _instrument(seen: dict) -> None:
    """In a rank: no module or tensor may be deep-copied; what is materialised when training starts
    is recorded; checkpoint writes are counted."""
    import copy

    from llmslim.distill import trainer

    deepcopy = copy.deepcopy

    def guarded(obj, *args, **kwargs):
        if isinstance(obj, (torch.nn.Module, torch.Tensor)):
            raise AssertionError(f"copy.deepcopy of a {type(obj).__name__}")
        return deepcopy(obj, *args, **kwargs)

    copy.deepcopy = guarded
    train_step, write_atomic = trainer.Distiller._train_step, trainer.write_atomic

    def first_step(self, module, step):
        if "student_materialised" not in seen:
            seen["student_materialised"] = sum(p.numel() for p in self.student.parameters() if not p.is_meta)
            seen["teacher_given_materialised"] = sum(p.numel() for p in self.teacher.parameters() if not p.is_meta)
            seen["student_shards"], seen["teacher_shards"] = _local_numel(module), _local_numel(self._teacher)
            seen["dtypes"] = [str(next(m.parameters()).dtype) for m in (module, self._teacher)]
        return train_step(self, module, step)

    def counted(payload, path):
        seen.setdefault("checkpoint_steps", []).append(payload["progress"]["step"])
        seen["checkpoint_shapes"] = {k: list(v.shape) for k, v in payload["model"].items()}
        return write_atomic(payload, path)

    trainer.Distiller._train_step, trainer.write_atomic = first_step, counted
    import llmslim.pipeline

    load_model = llmslim.pipeline.load_model

    def loading(ref, *args, **kwargs):
        seen.setdefault("weights_loaded", []).append(Path(ref).name)
        return load_model(ref, *args, **kwargs)

    llmslim.pipeline.load_model = loading




def _main(recipe: str, out: str) -> None:
    """One rank: the CLI with the instrumentation; what it saw goes to OUT/rankN.json on exit."""
    import atexit

    torch.set_num_threads(1)
    seen: dict = {}
    _instrument(seen)
    atexit.register(lambda: Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen)))
    from llmslim.cli import app

    app(["run", recipe, "--json", "--quiet"], prog_name="llmslim")


def _recipe(workdir: Path, pair: Path) -> Path:
    path = workdir / "fsdp.yaml"
    path.write_text("\n".join([
        "version: 1", "name: fsdp", f"model: {pair / 'student'}", "dtype: float32", "device: cpu", "seed: 3",
        "steps:",
        f"  - distill: {{teacher: {pair / 'teacher'}, teacher_dtype: bfloat16, dataset: text:./data/train.txt,",
        "              tokens: 512, seqlen: 32, batch_size: 4, micro_batch_size: 2, lr: 3e-3, warmup: 0.25,",
        "              eval_every: 2, eval_windows: 4, checkpoint_every: 2, parallel: fsdp}",
        "evaluate:", "  perplexity: {dataset: text:./data/test.txt, seqlen: 32, max_windows: 4}",
        "output: ./out/fsdp"]) + "\n")
    return path


def _launch(workdir: Path, recipe: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    root = str(Path(__file__).resolve().parents[1])
    env.update(OMP_NUM_THREADS="1", LLMSLIM_DEBUG="1", PYTHONPATH=os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), __file__, str(recipe), str(workdir)]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout)  # only rank 0 prints a report
    return reports[0] if isinstance(reports, list) else reports


def _one_process(recipe: Path) -> torch.nn.Module:
    """The recipe's distill step in this process (no torch.distributed): the reference."""
    from llmslim.distill.data import build_data
    from llmslim.distill.trainer import Distiller
    from llmslim.recipe import load_recipe

    loaded = load_recipe(recipe)
    config = loaded.steps[0]
    student = load_model(str(loaded.model), "float32", "cpu")
    teacher = load_model(config.teacher, "bfloat16", "cpu")
    Distiller(student, config, build_data(config, load_tokenizer(str(loaded.model))), teacher=teacher,
              seed=loaded.seed).run()
    return student


def test_torchrun_fsdp_shards_publishes_from_rank_0_and_matches_one_process(workdir, pair):
    report = _launch(workdir, _recipe(workdir, pair))
    changed = report["steps"][0]["changed"]
    assert changed["world_size"] == 2 and changed["parallel"] == "fsdp" and changed["tokens"] == 512
    out = workdir / "out" / "fsdp"
    assert (out / "report.json").is_file() and (out / "model.safetensors").is_file()
    seen = [json.loads((workdir / f"rank{r}.json").read_text()) for r in (0, 1)]

    student = load_model(str(pair / "student"))
    shapes = [tuple(p.shape) for p in student.parameters()]
    total = sum(math.prod(s) for s in shapes)
    first_chunks = sum(math.ceil(s[0] / 2) * math.prod(s[1:]) for s in shapes)  # FSDP2: dim-0 chunks
    teacher_total = sum(p.numel() for p in load_model(str(pair / "teacher")).parameters())
    # while it trains, rank 1 holds no full student and no full teacher: only its shards
    assert seen[1]["student_materialised"] == 0 and seen[1]["teacher_given_materialised"] == 0
    assert "weights_loaded" not in seen[1] and "student" in seen[0]["weights_loaded"]  # rank 1 reads no weights
    assert seen[0]["student_shards"] == first_chunks and seen[1]["student_shards"] == total - first_chunks
    assert seen[0]["teacher_shards"] + seen[1]["teacher_shards"] == teacher_total
    assert max(seen[1]["student_shards"], seen[1]["teacher_shards"]) <= 0.51 * total
    # rank 0 keeps the pipeline's student (the source of the shards, the target of the result), not the
    # teacher; the teacher has rank 0's dtype on rank 1 too; the student trains in float32
    assert seen[0]["student_materialised"] == total and seen[0]["teacher_given_materialised"] == 0
    assert seen[0]["dtypes"] == seen[1]["dtypes"] == ["torch.float32", "torch.bfloat16"]
    # only rank 0 writes the training checkpoint (step 2; none after the last step), with full tensors
    assert seen[0]["checkpoint_steps"] == [2] and "checkpoint_steps" not in seen[1]
    assert seen[0]["checkpoint_shapes"] == {k: list(v.shape) for k, v in student.state_dict().items()}

    published = load_model(str(out)).state_dict()
    reference = _one_process(workdir / "fsdp.yaml").state_dict()
    moved = max((value - student.state_dict()[name]).abs().max().item() for name, value in reference.items())
    assert moved > 100 * ATOL
    for name, value in reference.items():
        torch.testing.assert_close(published[name], value, rtol=RTOL, atol=ATOL)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
