"""The whole `llmslim run` under torchrun: two CPU processes (gloo) run one
recipe with a distill step; only rank 0 measures, reports and publishes, and
the result matches a single-process run of the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from llmslim.modeling import load_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _recipe(workdir, model, name: str) -> str:
    path = workdir / f"{name}.yaml"
    path.write_text("\n".join([
        "version: 1", f"name: {name}", f"model: {model}", "dtype: float32", "device: cpu", "seed: 3",
        "steps:",
        "  - distill: {dataset: text:./data/train.txt, tokens: 1024, seqlen: 32, batch_size: 4, lr: 3e-3,",
        "              eval_every: 4, checkpoint_every: 4}",
        "evaluate:", "  perplexity: {dataset: text:./data/test.txt, seqlen: 32}",
        f"output: ./out/{name}",
    ]) + "\n")
    return str(path)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", LLMSLIM_DEBUG="1")
    return env


def test_torchrun_two_processes_publish_once(workdir, model_factory):
    model = model_factory("llama")
    recipe = _recipe(workdir, model, "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "llmslim", "run", recipe, "--json"]
    proc = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout)  # only rank 0 prints a report
    report = reports[0] if isinstance(reports, list) else reports
    assert report["status"] == "passed"
    changed = report["steps"][0]["changed"]
    assert changed["world_size"] == 2 and changed["parallel"] == "ddp" and changed["tokens"] == 1024
    out = workdir / "out" / "ddp"
    assert (out / "report.json").is_file() and (out / "model.safetensors").is_file()
    leftovers = [p.name for p in workdir.joinpath("out").iterdir() if p.name.startswith(".ddp.tmp")]
    assert leftovers == []

    single = _recipe(workdir, model, "single")
    proc = subprocess.run([sys.executable, "-m", "llmslim", "run", single, "--quiet"], cwd=workdir, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = load_model(str(out)).state_dict()
    b = load_model(str(workdir / "out" / "single")).state_dict()
    for name in a:  # the same global batches: equal up to the order of float sums
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)
