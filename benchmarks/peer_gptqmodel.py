"""Runs inside a separate virtual environment that has gptqmodel + optimum
(see ../shared/notes/peers-cpu.md); imports nothing from llmslim.

Two jobs, chosen by the first argument:

* ``load CKPT WINDOWS OUT [BACKEND]``: load an llmslim GPTQ checkpoint with stock
  ``transformers.AutoModelForCausalLM`` (GPTQ backend: optimum + gptqmodel;
  ``BACKEND``, e.g. ``gptq_torch``, forces a gptqmodel kernel: its default
  choice refuses partial groups), write its logits on the first windows and
  its perplexity.
* ``quantize MODEL CALIB WINDOWS BITS GROUP OUT``: quantize with GPTQModel on
  the same calibration windows, write wall time and perplexity (none for an
  empty WINDOWS file).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F


def ppl(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], 8):
            batch = windows[i : i + 8]
            logits = model(input_ids=batch).logits.float()
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def load(ckpt: str, windows_path: str, out: str, backend: str = "") -> None:
    from transformers import AutoModelForCausalLM, GPTQConfig

    windows = torch.load(windows_path)
    extra = {}
    if backend:
        bits = json.load(open(f"{ckpt}/config.json"))["quantization_config"]["bits"]
        extra["quantization_config"] = GPTQConfig(bits=bits, backend=backend)
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=torch.float16, **extra).eval()
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    with torch.no_grad():
        logits = model(input_ids=windows[:2]).logits.float()
    torch.save(logits, out + ".logits.pt")
    json.dump({"kernels": kernels, "perplexity": ppl(model, windows)}, open(out, "w"))


def quantize(model_dir: str, calib_path: str, windows_path: str, bits: str, group: str, out: str,
             grid: str = "sym") -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    calib = torch.load(calib_path)
    dataset = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    config = QuantizeConfig(bits=int(bits), group_size=int(group), sym=grid == "sym", desc_act=False,
                             device="cpu")
    model = GPTQModel.load(model_dir, config)  # QuantizeConfig.device picks the CPU
    start = time.perf_counter()
    model.quantize(dataset, batch_size=8)
    seconds = time.perf_counter() - start
    model.save(out + ".ckpt")
    windows = torch.load(windows_path)
    value = None  # an empty WINDOWS file skips GPTQModel's own evaluation (fp16 on CPU is slow)
    if windows.shape[0]:
        value = ppl(GPTQModel.load(out + ".ckpt", device="cpu").model, windows)
    json.dump({"quantize_seconds": seconds, "perplexity": value}, open(out, "w"))


if __name__ == "__main__":
    {"load": load, "quantize": quantize}[sys.argv[1]](*sys.argv[2:])
