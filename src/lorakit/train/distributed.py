"""torch.distributed glue: one process, or many under torchrun (DDP or FSDP; gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import contextlib
import os
import re
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


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def setup(device: str = "auto", *, cuda_count: int | None = None) -> Context:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run as a single process, on ``device``
    (the run config's key): ``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N`` (one process; under torchrun each process takes the GPU of its LOCAL_RANK). On CUDA, float32
    matrix products may use TF32 tensor cores (10-bit mantissa inputs, float32 accumulation), as every peer's
    trainer allows. ``cuda_count`` stands in for ``torch.cuda.device_count()`` in tests.

    Raises:
        ValueError: an unknown device, a CUDA device on a machine without one (or out of range), or ``cuda:N``
            under torchrun.
    """
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device, count, local if world > 1 else None)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world <= 1:
        return Context(device=chosen)
    rank = int(os.environ["RANK"])
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Context(rank=rank, world_size=world, device=chosen)


def resolve_device(device: str, cuda_count: int, local_rank: int | None = None) -> torch.device:
    """The torch device the ``device`` key names, given ``cuda_count`` visible GPUs; ``local_rank`` is set
    under torchrun, where each process takes its own GPU (see ``setup``)."""
    if not DEVICE_PATTERN.fullmatch(device or ""):
        raise ValueError(f"device={device!r}: use auto, cpu, cuda or cuda:N (N a GPU index)")
    if device == "cpu" or (device == "auto" and cuda_count == 0):
        return torch.device("cpu")
    if cuda_count == 0:
        raise ValueError(
            f"device={device}: no CUDA GPU is visible to PyTorch here (a CPU-only torch build, no driver, or "
            "CUDA_VISIBLE_DEVICES empty); use device: cpu, or auto to take a GPU only when there is one"
        )
    if local_rank is not None:
        if ":" in device:
            raise ValueError(
                f"device={device} under torchrun: each process takes the GPU of its LOCAL_RANK; use device: cuda "
                "and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if local_rank >= cuda_count:
            raise ValueError(f"LOCAL_RANK={local_rank} but only {cuda_count} GPU(s) are visible: start fewer processes")
        return torch.device("cuda", local_rank)
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= cuda_count:
        raise ValueError(f"device={device}: only {cuda_count} GPU(s) are visible (cuda:0 to cuda:{cuda_count - 1})")
    return torch.device("cuda", index)


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
