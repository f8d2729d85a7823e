"""Parallel training under torchrun: the process group, DDP or FSDP2 wrapping, and the few collectives
the loop needs. `model.py` knows nothing of any of it.

    torchrun --nproc-per-node 8 -m nanoforge pretrain --data … --out … --parallel fsdp
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m nanoforge pretrain --data … --out …          # the same command on every node

torchrun gives each process RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `init_distributed`
joins the group (NCCL when the ranks run on GPUs, gloo on CPUs). A plain `nanoforge pretrain` is one
rank of one and never touches torch.distributed.

- `ddp`: every rank holds the whole model and optimizer; gradients are averaged by bucketed all-reduce
  during the backward of the last micro-batch of a step (`grad_sync` holds it back on the others).
- `fsdp`: FSDP2 (`fully_shard`) on each transformer block and on the root: parameters, gradients and
  AdamW moments are sharded over the ranks, a block's weights are all-gathered just before it runs and
  freed after. With bf16 the all-gathers move bf16 weights and gradients are reduced in fp32.

Both average gradients over ranks, and each rank averages over its micro-batches, so a step's update is
the mean over the whole global batch: the same optimisation as one process with accumulation.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from nanoforge.config import CUDAGRAPH_MODES
from nanoforge.errors import NanoforgeError
from nanoforge.model import GPT
from nanoforge.train.hardware import pick_device

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank `rank` of `world_size` (rank 0 writes the files)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the group was created here (and is destroyed by `close`)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def close(self, synced: bool = False) -> None:
        """Leave the process group. `synced`: every rank got here, so wait for all of them first."""
        if self.owns_group and dist.is_initialized():
            if synced:
                dist.barrier()
            dist.destroy_process_group()


def run_then_close(d: Dist, fn: Callable[[], T]) -> T:
    """`fn()` on this rank, then the group closed: after a barrier when fn returned (every rank is past its
    last collective before any destroys the group: without it a 2-rank gloo run ended now and then in
    "terminate called without an active exception"), at once when fn raised (the others may never come)."""
    try:
        result = fn()
    except BaseException:
        d.close()
        raise
    d.close(synced=True)
    return result


def init_distributed(requested_device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group torchrun described in the environment (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(requested_device)
    if world == 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise NanoforgeError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                                 f"GPUs on this node (--nproc-per-node too large?)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, owns), device


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum `t` over the ranks, in place (a no-op for one process); returns it."""
    return _all_reduce(t, d, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The elementwise maximum of `t` over the ranks, in place; returns it."""
    return _all_reduce(t, d, dist.ReduceOp.MAX)


def _on_collective_device(t: torch.Tensor) -> torch.Tensor:
    """`t` where this process group's collectives can take it: NCCL takes GPU tensors only."""
    if t.device.type != "cuda" and dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def _all_reduce(t: torch.Tensor, d: Dist, op: dist.ReduceOp) -> torch.Tensor:
    if not d.active:
        return t
    moved = _on_collective_device(t)
    dist.all_reduce(moved, op=op)
    if moved is not t:
        t.copy_(moved)
    return t


def gather_strided(local: torch.Tensor, n: int, d: Dist) -> torch.Tensor:
    """Every rank's rows in one (n, ...) tensor on every rank, where rank r holds rows r, r + world, r + 2·world,
    … of n (the order of `items[rank::world]`); `local` is this rank's (ceil-or-floor(n / world), ...) rows.
    One all-gather of equal padded blocks; the identity for one process."""
    if not d.active:
        return local
    per = -(-n // d.world_size)
    block = local.new_zeros((per, *local.shape[1:]))
    block[: local.shape[0]] = local
    block = _on_collective_device(block)
    blocks = [torch.empty_like(block) for _ in range(d.world_size)]
    dist.all_gather(blocks, block)
    full = local.new_empty((n, *local.shape[1:]))
    for rank, b in enumerate(blocks):
        rows = len(range(rank, n, d.world_size))
        full[rank :: d.world_size] = b[:rows].to(full.device)
    return full


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank (e.g. a choice that rank 0 measured)."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_activations(model: GPT) -> None:
    """Keep only each block's input in forward and recompute its activations in backward.

    The block's `forward` is replaced on the instance, so parameter names (and checkpoints) are unchanged.
    """
    for block in model.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(model: GPT, d: Dist, device: torch.device, *, parallel: str, bf16: bool,
                compile: bool, compile_mode: str = "default") -> nn.Module:
    """Wrap `model` for this run and return the module the training step calls.

    `model` stays the module that the optimizer, evaluation and state dicts use: under FSDP it is sharded
    in place (it *is* the returned module); under DDP the wrapper only adds gradient synchronisation.
    Compilation is per block under FSDP (the all-gathers stay outside the graphs), whole-model otherwise.
    """
    if d.active and parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if compile and compile_mode in CUDAGRAPH_MODES:
            raise NanoforgeError(f"compile_mode={compile_mode} records CUDA graphs, which FSDP's gathered "
                                 f"weights (new memory at every step) do not allow; use max-autotune-no-cudagraphs "
                                 f"or default under --parallel fsdp")

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for block in model.h:
            if compile:
                block.compile(mode=compile_mode)
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    wrapped: nn.Module = model
    if d.active:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped, mode=compile_mode) if compile else wrapped


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(train_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward only when `enabled` (a step's last micro-batch)."""
    inner = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if isinstance(inner, DistributedDataParallel) and not enabled:
        with inner.no_sync():
            yield
        return
    if is_sharded(inner):
        inner.set_requires_gradient_sync(enabled)
    yield


def stored_names(model: nn.Module) -> list[str]:
    """The state-dict names that hold distinct tensors: a tied weight (lm_head = wte) appears once."""
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: a DTensor (an FSDP shard, its grad norm) is gathered, so every rank must call it then;
    any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_model_state(model: GPT, d: Dist) -> dict[str, torch.Tensor] | None:
    """Every weight whole, on the CPU, on rank 0 (None on the others): what the model artifact holds.

    Under FSDP the shards are gathered, so every rank must call it.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if not d.main:
        return None
    return {n: state[n].detach().contiguous().cpu() for n in stored_names(model)}


def replica(model: GPT, d: Dist, prepare: Callable[[GPT], Any] | None = None) -> GPT | None:
    """A plain (unsharded) model on rank 0 for generation, None elsewhere; every rank must call it.
    `prepare` gives the copy the sharded model's extra modules before the weights are loaded (LoRA layers)."""
    if not is_sharded(model):
        return model if d.main else None
    state = full_model_state(model, d)
    if state is None:
        return None
    copy = GPT(model.cfg)
    if prepare is not None:
        prepare(copy)
    copy.load_state_dict(state, strict=False)  # a tied weight comes back through the one it shares
    return copy.to(_device_of(model))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if hasattr(p, "to_local") else p.device
