"""torch.distributed glue: one process, or many under torchrun (DDP or FSDP; gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> Context:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend)
    return Context(rank=rank, world_size=world, device=device)


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def no_sync(wrapped: nn.Module):
    """Keep gradients local inside the block (gradient accumulation): DDP's no_sync, FSDP2's gradient sync off."""
    if isinstance(wrapped, DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce_sum(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        value = value.clone()
        td.all_reduce(value, op=td.ReduceOp.SUM)
    return value


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        td.barrier()


def teardown(ctx: Context) -> None:
    if ctx.distributed and td.is_initialized():
        td.destroy_process_group()
