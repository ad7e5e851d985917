"""Several processes through ``torchrun``: PyTorch DDP, or FSDP2 ``fully_shard``.

Launched by ``torchrun`` the environment holds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the
process group uses NCCL on GPUs and gloo on the CPU. Without them everything runs in one process
and the helpers below do nothing.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Context:
    """Join the ``torchrun`` process group when there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, device_id=(torch.device(device)
                                                            if backend == "nccl" else None))
    return Context(rank, world_size, local_rank, torch.device(device))


def teardown() -> None:
    """Leave the process group (call it from a ``finally``). After a run that completed, every
    rank first waits for the others: a gloo rank that tore its connections down while another
    still used them aborted once in CI ("terminate called without an active exception", the
    two-process DDP test, 2026-12-07). With an exception in flight it leaves at once: a
    barrier would wait for ranks that may be gone."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context, strategy: str) -> nn.Module:
    """``"ddp"``: DistributedDataParallel. ``"fsdp"``: FSDP2, each block of the model's
    ``_no_split_modules`` (the transformers convention) sharded, then the root."""
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        block_names = set(getattr(model, "_no_split_modules", None) or ())
        if not block_names:
            raise ValueError(f"{type(model).__name__} names no _no_split_modules to shard")
        for module in model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module)
        fully_shard(model)
        return model
    raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return getattr(model, "module", model)


def no_gradient_sync(model: nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulated step."""
    if hasattr(model, "no_sync"):   # DDP
        return nullcontext() if last_micro_step else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        model.set_requires_gradient_sync(last_micro_step)
    return nullcontext()


def mean_over_ranks(value: float, ctx: Context) -> float:
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item()) / ctx.world_size


def gather_objects(obj, ctx: Context) -> list:
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
