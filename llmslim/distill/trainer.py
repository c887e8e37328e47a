"""The distillation loop: a student learns a teacher's next-token
distributions on windows of a text dataset (data order: :mod:`.data`).

* Randomness (dropout) is re-seeded from ``(seed, step, rank)`` at every
  step, inside a forked RNG, so the global RNG is left as it was and a resumed
  run draws exactly what an uninterrupted one would.
* Teacher: eval mode, no gradients, any dtype; its outputs live for one
  micro-batch. The student trains in float32 (cast back to its dtype at the
  end), under bf16 autocast when asked or, with ``auto``, on CUDA devices
  that support it. AdamW (weight decay on matrices only), linear warm-up then
  cosine decay to zero, gradient clipping, gradient accumulation over
  micro-batches, optional gradient checkpointing.
* Checkpoints: every ``checkpoint_every`` steps, and when SIGINT/SIGTERM
  asks to stop (after the step in progress, then ``KeyboardInterrupt``), the
  student's weights, the optimizer and scheduler states, the step (hence the
  data position and the RNG) and the curves so far are written atomically to
  ``scratch/distill-state.pt``; a new run with the same config, seed, data and
  student shapes resumes from it and ends with the weights an uninterrupted
  run would have.
* Sparsity: with ``keep_zeros`` (a model a ``sparsify`` step made sparse)
  the exact zeros of the decoder layers' linear weights are a fixed mask,
  re-applied after every optimizer step, so they are exactly 0 at the end.
* Data parallel: when torch.distributed is initialised with more than one
  rank the student is wrapped in DDP (default) or, with FSDP, a sharded
  replica of it built on the meta device trains instead, next to a sharded
  teacher, and its weights are gathered back one parameter at a time
  (:mod:`.sharding`); evaluation windows are shared among ranks; only rank 0
  writes checkpoints.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from llmslim.distill.data import DistillData, SampleOrder, lr_factor, mix_seed
from llmslim.distill.distributed import all_reduce_sum, barrier, broadcast_object, world
from llmslim.distill.losses import distillation_loss
from llmslim.distill.records import DistillResult, Position
from llmslim.distill.runtime import (adamw, apply_masks, autocast_dtype, perplexity_over_ranks, read_state, scalar,
                                    set_checkpointing, stop_on_signals, write_atomic, zero_masks)
from llmslim.distill.sharding import (full_states, gather_into, load_states, park, reshard, shard_student,
                                     shard_teacher)
from llmslim.errors import StepError, Terminated
from llmslim.modeling import decoder_layers
from llmslim.progress import LOGGER
from llmslim.recipe.steps import DistillConfig

__all__ = ["Distiller", "STATE_FILE"]

STATE_FILE = "distill-state.pt"
STATE_FORMAT = 1
MAX_CURVE_POINTS = 200


class Distiller:
    """Distils ``teacher`` into ``student`` (changed in place) as ``config`` says.

    ``callback(step, distiller)`` runs after every completed step (tests use
    it to interrupt); :meth:`request_stop` makes the loop checkpoint and raise
    ``KeyboardInterrupt`` after the step in progress. With FSDP a sharded
    replica trains (:mod:`.sharding`); its weights reach the student on rank
    0, and on the other ranks too with ``result_on_every_rank`` (later steps
    of a follower need them; after a failure a follower's student is left
    empty, on meta); the teacher handed in is emptied once sharded.
    """

    def __init__(self, student: nn.Module, config: DistillConfig, data: DistillData, *,
                 teacher: nn.Module | None = None, device: torch.device | str = "cpu", seed: int = 0,
                 scratch: Path | None = None, progress=None,
                 callback: Callable[[int, Distiller], None] | None = None, keep_zeros: bool = False,
                 result_on_every_rank: bool = True):
        self.student, self.config, self.data, self.teacher = student, config, data, teacher
        self._teacher: nn.Module | None = None  # the teacher that runs: the given one, or its shards
        self.device, self.seed = torch.device(device), seed
        self.scratch = Path(scratch) if scratch is not None else None
        self.progress, self.callback = progress, callback
        self.keep_zeros, self.result_on_every_rank = keep_zeros, result_on_every_rank
        self._zero_masks: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.rank, self.world_size = world()
        self.parallel = config.parallel if self.world_size > 1 else None
        self.weights = config.loss_weights
        self.total = config.total_steps
        self.warmup_steps = round(config.warmup * self.total)
        self.order = SampleOrder(data.train.shape[0], seed)
        self._stop, self._stop_signal = False, None
        self._check()
        share = config.batch_size // self.world_size
        self.share, self.micro = share, min(config.micro_batch_size or share, share)
        self.autocast_dtype = autocast_dtype(config.autocast, self.device)

    # -- setup -------------------------------------------------------------------------------------------------

    def _check(self) -> None:
        cfg = self.config
        if cfg.batch_size % self.world_size:
            raise StepError("distill", f"batch_size {cfg.batch_size} does not split evenly over "
                                       f"{self.world_size} ranks")
        share = cfg.batch_size // self.world_size
        micro = min(cfg.micro_batch_size or share, share)
        if share % micro:
            raise StepError("distill", f"micro_batch_size {micro} does not divide each rank's share "
                                       f"({share} windows) of batch_size {cfg.batch_size}")
        if self.teacher is None and self.config.needs_teacher:
            raise StepError("distill", "this loss needs a teacher model")
        if self.teacher is not None:
            s_emb, t_emb = self.student.get_input_embeddings(), self.teacher.get_input_embeddings()
            s_out, t_out = self.student.get_output_embeddings(), self.teacher.get_output_embeddings()
            if s_out is not None and t_out is not None and s_out.weight.shape[0] != t_out.weight.shape[0]:
                raise StepError("distill", f"the teacher's vocabulary ({t_out.weight.shape[0]}) differs from the "
                                           f"student's ({s_out.weight.shape[0]}); they must share the tokenizer")
            if cfg.hidden_states > 0 and s_emb.weight.shape[1] != t_emb.weight.shape[1]:
                raise StepError("distill", f"hidden_states needs equal widths; the student's is "
                                           f"{s_emb.weight.shape[1]}, the teacher's {t_emb.weight.shape[1]}")
        if self.keep_zeros and self.parallel == "fsdp":
            raise StepError("distill", "keeping a sparse model's zeros fixed is unsupported with parallel: fsdp; "
                                       "use parallel: ddp")
        if cfg.grad_checkpointing and not getattr(self.student, "supports_gradient_checkpointing", False):
            raise StepError("distill", f"{type(self.student).__name__} does not support gradient checkpointing")

    def _autocast(self):
        dtype = self.autocast_dtype
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        self._stop, self._stop_signal = True, signum

    def _identity(self) -> dict:
        shapes = [(n, tuple(p.shape)) for n, p in self.student.state_dict().items()]
        return {"format": STATE_FORMAT, "config": self.config.model_dump(mode="json"), "seed": self.seed,
                "data": self.data.digest(), "shapes": hashlib.sha256(repr(shapes).encode()).hexdigest(),
                "optimizer_layout": "fsdp" if self.parallel == "fsdp" else "plain"}

    @property
    def state_path(self) -> Path | None:
        return self.scratch / STATE_FILE if self.scratch is not None else None

    def _check_same_start(self, state: dict | None) -> None:
        """Every rank must resume from the same step as rank 0 (or all start afresh)."""
        mine = state["progress"]["step"] if state is not None else None
        leader = broadcast_object(mine)
        if mine != leader:
            raise StepError("distill", f"rank {self.rank} would start at step {mine or 0} but rank 0 resumes at "
                                       f"step {leader or 0}: the work folder ({self.state_path}) must be on a "
                                       "filesystem every rank sees")

    def _wrap(self) -> nn.Module:
        if self.parallel == "fsdp":
            return shard_student(self.student, self.device, self.config.grad_checkpointing)
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            return DistributedDataParallel(self.student, device_ids=ids, broadcast_buffers=False)
        return self.student

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _save(self, module: nn.Module, optimizer, scheduler, pos: Position, identity: dict, t_start: float) -> None:
        if self.state_path is None:
            return
        if self.parallel == "fsdp":
            weights, opt_state = full_states(module, optimizer)
        else:
            weights, opt_state = self.student.state_dict(), optimizer.state_dict()
        if self.rank == 0:
            saved = copy.copy(pos)
            saved.wall_seconds = pos.wall_seconds + (time.perf_counter() - t_start)
            payload = {"identity": identity, "progress": asdict(saved), "model": weights,
                       "optimizer": opt_state, "scheduler": scheduler.state_dict()}
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(payload, self.state_path)
            LOGGER.info("distill: checkpoint at step %d/%d", pos.step, self.total)
        barrier()

    def _load_optimizer(self, module: nn.Module, optimizer, state: dict) -> None:
        if self.parallel == "fsdp":
            load_states(module, optimizer, state)  # the weights too: the shards were filled from the student
        else:
            optimizer.load_state_dict(state["optimizer"])

    # -- evaluation ----------------------------------------------------------------------------------------------

    def perplexity(self, module: nn.Module, windows: torch.Tensor | None = None) -> float:
        """exp(mean next-token NLL) over the evaluation windows, shared among ranks."""
        windows = self.data.evaluation if windows is None else windows
        ppl = perplexity_over_ranks(module, windows, self.micro, self.device)
        reshard(module)
        return ppl

    # -- training ------------------------------------------------------------------------------------------------

    def _sync_context(self, module: nn.Module, last: bool):
        if self.parallel == "ddp" and not last:
            return module.no_sync()
        if self.parallel == "fsdp":
            module.set_requires_gradient_sync(last)
        return nullcontext()

    def _micro_loss(self, module: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = self.config.hidden_states > 0
        teacher_logits, teacher_states = None, ()
        if self._teacher is not None and self.config.needs_teacher:
            with torch.no_grad(), self._autocast():
                out = self._teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            teacher_logits = out.logits
            teacher_states = out.hidden_states if hidden else ()
            del out
        with self._autocast():
            out = module(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        student_states: tuple = ()
        if hidden:
            n_s, n_t = len(out.hidden_states) - 1, len(teacher_states) - 1
            pairs = [(j, round(j * n_t / n_s)) for j in range(1, n_s + 1)]
            student_states = tuple(out.hidden_states[j] for j, _ in pairs)
            teacher_states = tuple(teacher_states[k] for _, k in pairs)
        return distillation_loss(self.weights, out.logits, ids, teacher_logits=teacher_logits,
                                 temperature=self.config.temperature, hidden_weight=self.config.hidden_states,
                                 student_states=student_states, teacher_states=teacher_states)

    def _train_step(self, module: nn.Module, step: int) -> dict[str, float]:
        batch = self.config.batch_size
        idx = self.order.indices(step * batch + self.rank * self.share, self.share)
        windows = self.data.train[idx]
        chunks = self.share // self.micro
        sums: dict[str, float] = {}
        for j in range(chunks):
            ids = windows[j * self.micro : (j + 1) * self.micro].to(self.device)
            with self._sync_context(module, j == chunks - 1):
                loss, parts = self._micro_loss(module, ids)
                (loss / chunks).backward()
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value / chunks
            del loss
        return sums

    def _terms(self) -> list[str]:
        return ["loss", *self.weights, *(["hidden_cosine"] if self.config.hidden_states > 0 else [])]

    def _begin_plain(self) -> dict[str, tuple[torch.dtype, bool]]:
        """Single process and DDP train the student itself, in float32; its dtypes and flags, to restore."""
        saved = {name: (p.dtype, p.requires_grad) for name, p in self.student.named_parameters()}
        for p in self.student.parameters():
            p.data = p.data.float()
            p.requires_grad_(True)
        self._zero_masks = zero_masks(decoder_layers(self.student)) if self.keep_zeros else []
        if self.config.grad_checkpointing:
            set_checkpointing(self.student, True)
        return saved

    def _end(self, saved: dict[str, tuple[torch.dtype, bool]]) -> None:
        student = self.student
        if self.parallel == "fsdp":
            if self.rank == 0:
                park(student, self.device)  # back from the CPU after a failure (a no-op after the gather)
        else:
            if self.config.grad_checkpointing:
                set_checkpointing(student, False)
            for name, p in student.named_parameters():
                p.data = p.data.to(saved[name][0])
                p.requires_grad_(saved[name][1])
                p.grad = None
        student.eval()
        self._zero_masks, self._teacher = [], None

    def run(self) -> DistillResult:
        """Train for the configured budget (or what remains of it) and evaluate."""
        t_start = time.perf_counter()
        identity = self._identity()
        state = read_state(self.state_path, identity)
        self._check_same_start(state)
        pos = Position(**state["progress"]) if state is not None else Position()
        resumed_from = pos.step if state is not None else None
        if state is not None:
            LOGGER.info("distill: resuming at step %d/%d from %s", pos.step, self.total, self.state_path)
        fsdp = self.parallel == "fsdp"
        saved = {} if fsdp else self._begin_plain()
        module = None
        try:
            if state is not None and not fsdp:
                self.student.load_state_dict(state["model"])
            module = self._wrap()
            optimizer = adamw(module, self.config.lr, self.config.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, functools.partial(lr_factor, total=self.total, warmup_steps=self.warmup_steps))
            if state is not None:
                self._load_optimizer(module, optimizer, state)
                scheduler.load_state_dict(state["scheduler"])
            del state
            self._teacher = shard_teacher(self.teacher, self.device) if fsdp and self.teacher is not None \
                else self.teacher
            eval_module = self.student if self.parallel == "ddp" else module
            self._evaluate_before(eval_module, pos)
            self._loop(module, eval_module, optimizer, scheduler, pos, identity, t_start)
            after = self.perplexity(eval_module)
            pos.eval_curve.append({"step": self.total, "tokens": pos.tokens, "perplexity": after})
            if fsdp:
                del optimizer, scheduler
                gather_into(module, self.student, self.device, write=self.rank == 0 or self.result_on_every_rank)
        finally:
            del module
            self._end(saved)
        LOGGER.info("distill: perplexity %.4f -> %.4f after %d tokens", pos.perplexity_before, after, pos.tokens)
        return self._result(pos, t_start, after, resumed_from)

    def _evaluate_before(self, eval_module: nn.Module, pos: Position) -> None:
        if pos.perplexity_before is not None:
            return
        pos.perplexity_before = self.perplexity(eval_module)
        if self._teacher is not None:
            pos.teacher_perplexity = self.perplexity(self._teacher)
        pos.eval_curve.append({"step": 0, "tokens": 0, "perplexity": pos.perplexity_before})
        LOGGER.info("distill: perplexity before %.4f%s", pos.perplexity_before,
                    f" (teacher {pos.teacher_perplexity:.4f})" if pos.teacher_perplexity else "")

    def _result(self, pos: Position, t_start: float, after: float, resumed_from: int | None) -> DistillResult:
        return DistillResult(
            steps=self.total, tokens=pos.tokens, wall_seconds=pos.wall_seconds + time.perf_counter() - t_start,
            train_seconds=pos.train_seconds, perplexity_before=pos.perplexity_before, perplexity_after=after,
            teacher_perplexity=pos.teacher_perplexity,
            curves={"loss": pos.loss_curve, "eval_perplexity": pos.eval_curve}, resumed_from_step=resumed_from,
            world_size=self.world_size, parallel=self.parallel,
            autocast=str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else None,
            train_windows=self.data.train.shape[0], eval_windows=self.data.evaluation.shape[0],
            eval_source=self.data.eval_source)

    def _record(self, pos: Position, values: dict[str, float], log_every: int) -> None:
        """Add a step's values to the loss curve: one point, the mean, every ``log_every`` steps."""
        for key, value in values.items():
            pos.pending[key] = pos.pending.get(key, 0.0) + value
        pos.pending_steps += 1
        if pos.step % log_every and pos.step != self.total:
            return
        point = {"step": pos.step, "tokens": pos.tokens, **{k: v / pos.pending_steps for k, v in pos.pending.items()}}
        pos.loss_curve.append(point)
        pos.pending, pos.pending_steps = {}, 0
        LOGGER.info("distill: step %d/%d loss %.4f lr %.3g %.0f tokens/s", pos.step, self.total, point["loss"],
                    point["lr"], pos.tokens / max(pos.train_seconds, 1e-9))

    def _loop(self, module, eval_module, optimizer, scheduler, pos: Position, identity: dict, t_start) -> None:
        cfg, terms = self.config, self._terms()
        log_every = max(1, -(-self.total // MAX_CURVE_POINTS))
        tokens_per_step = cfg.batch_size * cfg.seqlen
        fork = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        steps = range(pos.step, self.total)
        if self.progress is not None:
            steps = self.progress.track(steps, "distill", total=len(steps))
        with torch.random.fork_rng(devices=fork, device_type=self.device.type), stop_on_signals(self.request_stop):
            for step in steps:
                t0 = time.perf_counter()
                torch.manual_seed(mix_seed(self.seed, step, self.rank))
                module.train()
                lr = scheduler.get_last_lr()[0]
                sums = self._train_step(module, step)
                extra = {"lr": lr}
                if cfg.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
                    extra["grad_norm"] = scalar(norm)  # before clipping
                optimizer.step()
                apply_masks(self._zero_masks)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                reduced = torch.tensor([sums[k] for k in terms] + [float(self._stop)], dtype=torch.float64,
                                       device=self.device)
                all_reduce_sum(reduced)
                values = {k: float(v) / self.world_size for k, v in zip(terms, reduced.tolist())}
                stop = reduced[-1].item() > 0
                pos.step, pos.tokens = step + 1, pos.tokens + tokens_per_step
                pos.train_seconds += time.perf_counter() - t0
                self._record(pos, {**values, **extra}, log_every)
                if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < self.total:
                    ppl = self.perplexity(eval_module)
                    pos.eval_curve.append({"step": pos.step, "tokens": pos.tokens, "perplexity": ppl})
                    LOGGER.info("distill: step %d perplexity %.4f", pos.step, ppl)
                if stop:
                    self._save(module, optimizer, scheduler, pos, identity, t_start)
                    stopped = Terminated if self._stop_signal == signal.SIGTERM else KeyboardInterrupt
                    raise stopped(f"distill stopped after step {pos.step}/{self.total}; run again to resume")
                if pos.step % cfg.checkpoint_every == 0 and pos.step < self.total:
                    self._save(module, optimizer, scheduler, pos, identity, t_start)
                if self.callback is not None:
                    self.callback(pos.step, self)
