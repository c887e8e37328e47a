"""The phases of a run whose memory plan streams (:mod:`llmslim.memory_plan`).

A streamed run keeps no model in memory between phases: each phase reads what
it needs from disk, the input model or the previous step's checkpoint, and
follows the plan's mode for it:

* ``baseline`` / ``evaluate`` streamed: perplexity layer by layer
  (:mod:`llmslim.evaluate.streamed`); latency and energy are skipped with the
  plan's reason. Resident: today's evaluation on a loaded model.
* a step streamed (``gptq``, ``rtn`` only): its layer loop loads each decoder
  layer from the source checkpoint, quantizes it (packing it at once for
  ``format: gptq``) and writes it into the step's checkpoint through a
  :class:`~llmslim.shards.ShardWriter` before the next layer is read. A step
  planned resident loads the model, runs as usual and is saved as usual.

Step checkpoints, their records, resume and publishing are those of a resident
run (:class:`llmslim.workspace.StepStore`, :mod:`llmslim.outcome`): a streamed
checkpoint is written aside, renamed, then committed by its record.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from llmslim.errors import StepError, UsageError
from llmslim.evaluate import evaluate_model, model_size_bytes
from llmslim.evaluate.memory import PeakMemory
from llmslim.evaluate.streamed import evaluate_streamed
from llmslim.memory_estimates import step_phase
from llmslim.memory_plan import MemoryPlan
from llmslim.modeling import load_model, weights_size_bytes
from llmslim.progress import LOGGER
from llmslim.publish import writing_step
from llmslim.quant.checkpoint import write_quantize_config
from llmslim.report import Metrics, StepRecord
from llmslim.run_env import evaluate_result
from llmslim.shards import ShardWriter
from llmslim.steps import run_step
from llmslim.steps.base import StepContext, StepOutcome
from llmslim.steps.gptq import apply_gptq
from llmslim.steps.rtn import apply_rtn
from llmslim.streaming import LazyModel, StreamedLayers
from llmslim.weight_files import weights_problem

__all__ = ["streaming_problem", "StreamedRun", "streamed_run", "write_streamed_step"]


def streaming_problem(recipe, plan: MemoryPlan) -> str | None:
    """Why a recipe cannot run with ``plan``: a step planned streamed that has no layer-by-layer form."""
    for index, step in enumerate(recipe.steps):
        phase = step_phase(index, step)
        why = step.stream_problem()
        if plan.mode(phase) == "streamed" and why:
            return (f"step {index + 1} ({step.STEP_NAME}) cannot run streamed (one decoder layer at a time): "
                    f"{why}. The memory plan streams it ({plan.phase(phase).reason}); set memory.mode: resident "
                    "or a larger memory.max_device_memory if the model fits, or change the step")
    return None


def streamed_run(run, plan: MemoryPlan | None) -> StreamedRun | None:
    """The streamed phases of ``run``, or None when the plan keeps every phase resident (today's path).
    A step that cannot stream is refused before anything is loaded (UsageError)."""
    if plan is None or not plan.streamed:
        return None
    problem = streaming_problem(run.recipe, plan)
    if problem:
        raise UsageError(f"{run.recipe.name}: {problem}")
    return StreamedRun(run, plan)


def _write_config(model, folder: Path) -> None:
    """config.json (with the quantization_config of packed layers), generation config and
    quantize_config.json, as :func:`llmslim.modeling.save_checkpoint` writes them."""
    config = model.config
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_quantize_config(folder, config)


def _uses_activations(step) -> bool:
    """Whether a streamed step runs the calibration windows through the layers (it then needs the
    embeddings to compute the first layer's inputs)."""
    name = step.STEP_NAME
    return (name == "gptq" or (name == "prune" and step.importance != "magnitude")
            or (name == "sparsify" and step.method in ("wanda", "sparsegpt")))


def _streamed_apply(model, step, ctx: StepContext, layers: StreamedLayers, activations) -> StepOutcome:
    """The step's own function, given the streamed layer source (the steps of :meth:`stream_problem` None)."""
    from llmslim.steps.prune import apply_prune
    from llmslim.steps.sparsify import sparsify_once

    name = step.STEP_NAME
    if name == "gptq":
        return apply_gptq(model, step, ctx, layers=layers, activations=activations)
    if name == "rtn":
        return apply_rtn(model, step, ctx, layers=layers)
    if name == "prune":
        return apply_prune(model, step, ctx, layers=layers, activations=activations)
    if name == "sparsify":
        return sparsify_once(model, step, ctx, layers=layers, activations=activations)
    raise StepError(name, "has no layer-by-layer form")


class _CountingWriter:
    """A :class:`ShardWriter` that also counts the zeros of every tensor it writes (a streamed model's
    sparsity, which no resident copy exists to count)."""

    def __init__(self, writer: ShardWriter):
        self.writer, self.zeros, self.numel = writer, 0, 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for tensor in tensors.values():
            if tensor.is_floating_point():
                self.zeros += int((tensor == 0).sum())
                self.numel += tensor.numel()
        self.writer.add(tensors)


def write_streamed_step(lazy: LazyModel, step, ctx: StepContext, folder: Path, tokenizer, *,
                        max_shard_size: int, activations: torch.device | None = None) -> StepOutcome:
    """Run a step whose :meth:`stream_problem` is None over ``lazy`` one decoder layer at a time, writing
    the result into ``folder`` (a complete checkpoint: weights in state-dict order, config, tokenizer)."""
    why = step.stream_problem()
    if why:
        raise StepError(step.STEP_NAME, f"cannot run streamed: {why}")
    device = torch.device(ctx.device)
    head, tail = lazy.outer_keys()
    with ShardWriter(folder, max_shard_size, spool=True) as shards:
        writer = _CountingWriter(shards)
        for key, tensor in lazy.read_saved(head):
            writer.add({key: tensor})
        layers = StreamedLayers(lazy, device, writer)
        outer = _uses_activations(step)
        if outer:
            lazy.load_outer(device)  # embeddings and rotary tables compute the first layer's inputs
        try:
            outcome = _streamed_apply(lazy.model, step, ctx, layers, activations)
        finally:
            if outer:
                lazy.release_outer()
        layers.finish()  # a layer the step left alone (a pruning plan that changes nothing) is copied
        for key, tensor in lazy.read_saved(tail):
            writer.add({key: tensor})
    if step.STEP_NAME == "sparsify" and writer.numel:
        outcome.changed["model_sparsity"] = float(f"{writer.zeros / writer.numel:.6g}")
    _write_config(lazy.model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return outcome


class StreamedRun:
    """A run's phases under a plan with streamed phases (see the module docstring)."""

    def __init__(self, run, plan: MemoryPlan):
        self.run, self.plan = run, plan

    def _activations(self, phase: str) -> torch.device:
        return torch.device("cpu") if self.plan.phase(phase).activations == "host" else self.run.device

    def _lazy(self, folder: Path) -> LazyModel:
        """The model of ``folder``, streamed; on a GPU the next layer is read from disk while one computes."""
        return LazyModel(folder, self.run.recipe.dtype, trust_remote_code=self.run.recipe.trust_remote_code,
                         prefetch=self.run.device.type == "cuda")

    def _streamed_metrics(self, lazy: LazyModel, size_bytes: int, windows, phase: str) -> Metrics:
        return evaluate_streamed(lazy, self.run.recipe.evaluate, size_bytes=size_bytes, windows=windows,
                                 device=self.run.device, activations=self._activations(phase),
                                 reason=self.plan.phase(phase).reason, progress=self.run.progress)

    def baseline(self, windows) -> Metrics:
        """The original model's metrics (the caller caches them in the work folder)."""
        from llmslim.pipeline import load_original

        recipe, path = self.run.recipe, self.run.model_path
        if self.plan.mode("baseline") == "resident":
            model = load_original(self.run)
            return evaluate_model(model, recipe.evaluate, size_bytes=model_size_bytes(model, path),
                                  windows=windows, seed=recipe.seed, progress=self.run.progress)
        lazy = self._lazy(path)
        return self._streamed_metrics(lazy, model_size_bytes(None, path, lazy.saved_bytes()), windows, "baseline")

    def evaluate(self, baseline: Metrics, final_dir: Path, windows) -> tuple[Metrics, Metrics]:
        """(baseline, result): the final checkpoint measured, streamed or loaded as the plan says."""
        from llmslim.pipeline import load_original

        recipe = self.run.recipe
        if self.plan.mode("evaluate") == "streamed":
            return baseline, self._streamed_metrics(self._lazy(final_dir), weights_size_bytes(final_dir), windows,
                                                    "evaluate")
        model = load_model(str(final_dir), recipe.dtype, self.run.device, trust_remote_code=recipe.trust_remote_code)
        baseline, result = evaluate_result(recipe, self.run.device, lambda: load_original(self.run), model, baseline,
                                           size_bytes=weights_size_bytes(final_dir), windows=windows,
                                           progress=self.run.progress)
        if baseline.latency_settings is not None:  # the original fitted beside the result and was timed with it
            baseline = baseline.model_copy(update={"latency_unavailable_reason": None})
        return baseline, result

    def _resume(self) -> int:
        """The last completed step whose record and checkpoint are intact (headers checked, -1: none)."""
        store, done = self.run.store, self.run.store.last_completed()
        while done >= 0:
            problem = weights_problem(store.checkpoint(done), trust_remote_code=self.run.recipe.trust_remote_code)
            try:
                StepRecord.model_validate(store.record(done))
            except ValueError as exc:
                problem = problem or str(exc).splitlines()[0]
            if problem is None:
                LOGGER.info("%s: resuming after step %d (%s)", self.run.recipe.name, done + 1,
                            self.run.recipe.steps[done].STEP_NAME)
                return done
            LOGGER.warning("%s: the checkpoint of step %d cannot be used (%s); computing it again",
                           self.run.recipe.name, done + 1, problem)
            store.discard_from(done)
            done -= 1
        return -1

    def steps(self, tokenizer, ctx: StepContext) -> list[StepRecord]:
        """Every step after the last stored one, each checkpointed in the run's store."""
        from llmslim.pipeline import step_record

        run, store, records = self.run, self.run.store, []
        done = self._resume()
        for index, step in enumerate(run.recipe.steps):
            if index <= done:
                records.append(StepRecord.model_validate(store.record(index)).model_copy(update={"resumed": True}))
                continue
            phase = step_phase(index, step)
            mode = self.plan.mode(phase)
            LOGGER.info("%s: step %d/%d %s (%s)", run.recipe.name, index + 1, len(run.recipe.steps),
                        step.describe(), mode)
            source = run.model_path if index == 0 else store.checkpoint(index - 1)
            scratch = store.scratch(index)
            scratch.mkdir(parents=True, exist_ok=True)
            step_ctx = replace(ctx, scratch=scratch)
            start = time.perf_counter()
            if mode == "streamed":
                with PeakMemory(ctx.device) as peak:
                    outcome = self._stream_step(index, step, source, step_ctx, tokenizer, phase)
                record = step_record(step, start, peak, outcome)
                self._commit(index, record, peak, phase)
            else:
                record = self._resident_step(index, step, source, step_ctx, tokenizer, start, phase)
            records.append(record)
        return records

    def _commit(self, index: int, record: StepRecord, peak, phase: str) -> None:
        from llmslim.pipeline import commit_step

        if self.run.memory is not None:
            self.run.memory.record(phase, peak.peak_bytes, peak.host_peak_bytes, record.wall_seconds,
                                   peak.host_method)
        store = self.run.store
        store.temporary(index).rename(store.checkpoint(index))
        commit_step(store, index, record)

    def _stream_step(self, index: int, step, source: Path, ctx: StepContext, tokenizer, phase: str) -> StepOutcome:
        store = self.run.store
        final, tmp = store.checkpoint(index), store.temporary(index)
        lazy = self._lazy(source)
        with writing_step(final, tmp, index, lazy.saved_bytes() + 50_000_000):
            return write_streamed_step(lazy, step, ctx, tmp, tokenizer,
                                       max_shard_size=self.run.recipe.memory.max_shard_size,
                                       activations=self._activations(phase))

    def _resident_step(self, index: int, step, source: Path, ctx: StepContext, tokenizer, start: float,
                       phase: str) -> StepRecord:
        """A step the plan keeps resident: loaded from its source, run and saved as in a resident run."""
        from llmslim.pipeline import _save_step, step_record

        recipe = self.run.recipe
        with PeakMemory(ctx.device) as peak:
            model = load_model(str(source), recipe.dtype, ctx.device, trust_remote_code=recipe.trust_remote_code)
            outcome = run_step(model, step, ctx)
        record = step_record(step, start, peak, outcome)
        if self.run.memory is not None:
            self.run.memory.record(phase, peak.peak_bytes, peak.host_peak_bytes, record.wall_seconds,
                                   peak.host_method)
        _save_step(self.run.store, index, model, tokenizer, record, recipe.memory.max_shard_size)
        return record
