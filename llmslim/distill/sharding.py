"""FSDP2 sharding of a distillation (``parallel: fsdp``) that really shards.

* The trained module is a *replica* of the student: the same class built from
  its config on the meta device (no memory, no ``copy.deepcopy``), sharded
  with ``fully_shard`` on each decoder layer then the root, materialised as
  shards only (``to_empty``) and filled from rank 0's weights, broadcast one
  tensor at a time (``set_model_state_dict(..., broadcast_from_rank0=True)``).
  It trains in float32 whatever the student's dtype; the student keeps its own.
* While it trains, the student's own parameters are parked: on the meta device
  (no memory) on the other ranks, on the CPU on rank 0 when the device is a
  GPU (rank 0's copy is the source of the shards and the target of the result).
* The teacher is sharded the same way (eval mode, no gradients, its root
  resharded after every forward); the teacher handed in is parked on meta once
  its weights are in the shards, so no rank keeps a full teacher.
* At the end every trained parameter is all-gathered on its own
  (``DTensor.full_tensor``) and written into the student's parameter of the
  same name, in its dtype, on rank 0 (or on every rank, which later steps of a
  follower need); never a full gathered state dict per rank.

Memory per rank (W ranks, P student and Q teacher parameters, the teacher in
b bytes each, the student's shards in float32): 4P/W weights + 4P/W gradients +
8P/W AdamW moments + bQ/W teacher, plus one decoder layer's full parameters
while it runs (two with FSDP's prefetch) and the root group (embeddings, final
norm, lm_head) unsharded from the forward to the end of the backward, plus the
activations of a micro-batch. Rank 0 also holds the student in its own dtype
(on its CPU with a GPU) and, when it writes a training checkpoint, the full
float32 weights and AdamW state on its CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llmslim.distill.distributed import agree, broadcast_object, world
from llmslim.errors import StepError
from llmslim.modeling import decoder_layers

__all__ = ["shard_student", "shard_teacher", "gather_into", "reshard", "park", "empty_model", "full_states",
           "load_states", "replica_on_meta", "structure_problem"]

META = torch.device("meta")


def replica_on_meta(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model``'s class built from a copy of its config on the meta device, in ``dtype``."""
    config = type(model.config).from_dict(model.config.to_dict())  # _from_config rewrites the config's dtype
    with torch.device("meta"):
        return type(model)._from_config(config, dtype=dtype,
                                        attn_implementation=model.config._attn_implementation)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    return shapes


def structure_problem(model: nn.Module, replica: nn.Module, what: str) -> str | None:
    """Why ``replica`` cannot stand for ``model`` (other parameter or buffer names or shapes), or None."""
    mine, rebuilt = _shapes(model), _shapes(replica)
    if mine == rebuilt:
        return None
    missing = sorted(set(mine) - set(rebuilt))[:3]
    extra = sorted(set(rebuilt) - set(mine))[:3]
    shapes = [f"{n} {mine[n]} vs {rebuilt[n]}" for n in sorted(set(mine) & set(rebuilt)) if mine[n] != rebuilt[n]][:3]
    parts = [f"only in the {what}: {missing}" if missing else "", f"only when rebuilt: {extra}" if extra else "",
             f"shapes: {shapes}" if shapes else ""]
    return (f"parallel: fsdp rebuilds the {what} from its config, which gives other parameters "
            f"({'; '.join(p for p in parts if p)}); use parallel: ddp")


def _shard(module: nn.Module, reshard_root: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(module):
        fully_shard(layer)
    fully_shard(module, reshard_after_forward=True if reshard_root else None)


@torch.no_grad()
def _fill(sharded: nn.Module, device: torch.device, state: dict | None, buffers: dict | None) -> None:
    """Materialise the shards on ``device`` and fill them from rank 0's ``state`` (other ranks: None),
    one tensor at a time; buffers (also the non-persistent ones, e.g. rotary frequencies) from rank 0's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sharded.to_empty(device=device)
    rank = world()[0]
    set_model_state_dict(sharded, state if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in sharded.named_buffers():
        if rank == 0:
            buf.copy_(buffers[name])
        dist.broadcast(buf, src=0)


def _replica(model: nn.Module, dtype: torch.dtype, what: str) -> nn.Module:
    replica = replica_on_meta(model, dtype)
    problem = agree(structure_problem(model, replica, what))
    if problem is not None:
        raise StepError("distill", problem)
    return replica


def shard_student(student: nn.Module, device: torch.device, grad_checkpointing: bool = False) -> nn.Module:
    """The float32 sharded replica of ``student`` holding rank 0's weights; the student's own parameters
    are parked meanwhile (see the module docstring)."""
    from llmslim.distill.runtime import set_checkpointing

    replica = _replica(student, torch.float32, "student")
    if grad_checkpointing:
        set_checkpointing(replica, True)
    _shard(replica, reshard_root=False)
    rank = world()[0]
    source = rank == 0
    _fill(replica, device, student.state_dict() if source else None,
          dict(student.named_buffers()) if source else None)
    park(student, torch.device("cpu") if rank == 0 else META)
    return replica


def shard_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The sharded replica of ``teacher`` (rank 0's weights and dtype; eval mode, no gradients); the
    teacher handed in is parked on meta (its full weights freed)."""
    rank = world()[0]
    dtype = broadcast_object(next(teacher.parameters()).dtype if rank == 0 else None)
    replica = _replica(teacher, dtype, "teacher")
    replica.requires_grad_(False)
    _shard(replica, reshard_root=True)
    _fill(replica, device, teacher.state_dict() if rank == 0 else None,
          dict(teacher.named_buffers()) if rank == 0 else None)
    park(teacher, META)
    return replica.eval()


def park(model: nn.Module, device: torch.device) -> None:
    """Move ``model``'s parameters to ``device`` keeping the Parameter objects (ties included);
    ``meta`` frees them. A no-op for those already there."""
    for param in model.parameters():
        if param.device != device:
            moved = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
            torch.utils.swap_tensors(param, moved)


def reshard(module: nn.Module) -> None:
    """Free the unsharded parameters of every FSDP group under ``module`` (a no-op for plain modules): the
    root's stay after a forward without backward (an evaluation)."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


@torch.no_grad()
def gather_into(sharded: nn.Module, target: nn.Module, device: torch.device, write: bool) -> None:
    """Every parameter of ``sharded``, all-gathered one at a time, written (when ``write``) into
    ``target``'s parameter of the same name on ``device`` in the target's dtype."""
    reshard(sharded)
    for name, param in sharded.named_parameters():
        full = param.full_tensor()
        if write:
            dest = target.get_parameter(name)
            torch.utils.swap_tensors(dest, nn.Parameter(full.to(device=device, dtype=dest.dtype),
                                                        requires_grad=dest.requires_grad))
        del full


def full_states(sharded: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full weights and optimizer state on rank 0's CPU (empty on the other ranks), for a checkpoint."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(sharded, options=options),
            get_optimizer_state_dict(sharded, optimizer, options=options))


def load_states(sharded: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's full weights and optimizer state, read from rank 0's copy (broadcast tensor by tensor)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    source = world()[0] == 0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(sharded, state["model"] if source else {}, options=options)
    set_optimizer_state_dict(sharded, optimizer, state["optimizer"] if source else {}, options=options)


def empty_model(ref: str) -> nn.Module:
    """The causal LM at ``ref`` built from its config on the meta device (no weights read): what a
    rank other than 0 needs of an FSDP teacher, whose weights come from rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmslim.modeling import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(ref))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    return model.eval()
