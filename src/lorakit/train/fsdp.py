"""Sharded training (``train.strategy: fsdp``): PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``.

- Sharding: each transformer block (the classes a transformers model lists in ``_no_split_modules``) is one
  FSDP unit, everything else (embeddings, final norm, head) the root unit. The frozen base and the adapters are
  both sharded: every process holds 1/N of each. The shards keep their dtypes (under bf16-mixed a bfloat16 base
  and float32 adapters, FSDP2 takes both). On GPU under a mixed precision the blocks gather their weights in the
  autocast dtype and reduce gradients in float32 (``MixedPrecisionPolicy``); on CPU they gather as stored, over
  gloo, and the trainer's autocast casts. fp16-mixed is refused (the loss scaler's overflow check is per shard).
- Loading (``load_local_shards``): every rank builds the model's skeleton on the meta device
  (``load_model(skeleton=True)``) and the adapters on the CPU from the seeded generator, exactly as a single
  process does (same seed, same initial adapter); after sharding, each rank reads from the model's
  safetensors files only the rows of its own shards. No rank ever holds the whole model.
- Saving (``gathered_trainable``): the trained parameters gathered to rank 0 once, which writes an ordinary
  adapter directory, identical to a single process's and loadable without torch.distributed.
- Checkpoints (``save_sharded`` / ``load_sharded``): the adapters' shards and the optimizer's per-parameter
  state through ``torch.distributed.checkpoint`` in safetensors files, one per rank (no pickles), and the rest
  (step, schedule, optimizer hyperparameters, random states) in JSON and safetensors; resumable with the same
  number of processes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
from safetensors.torch import load_file
from torch import nn

from .. import durable
from .._bnb import float_dtype
from ..io import write_safetensors
from ..layers.base import LoraLayer
from ..layers.variants import DoraVariant, row_norms
from ..precision import Precision
from .checkpoint import jsonable, restore_rng, rng_tensors, tupled

SHARDS = "sharded"
STATE_JSON = "trainer_state.json"


def shard(model: nn.Module, device: torch.device, precision: Precision | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place: one unit per transformer block, the rest at the root. ``precision``:
    with autocast on a GPU, weights are gathered in its dtype and gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"train.strategy=fsdp: {type(model).__name__} names no transformer block class (_no_split_modules) "
            "to shard by; use train.strategy=ddp for this model"
        )
    kwargs: dict[str, Any] = {}
    if device.type == "cuda" and precision is not None and precision.autocast is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.autocast, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def real_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of a skeleton that are not on the meta device (the adapters, created and initialised on the
    CPU from the seeded generator, the same on every rank), moved to the meta device for sharding; their
    values are returned, by name."""
    values = {}
    for name, param in model.named_parameters():
        if not param.is_meta:
            values[name] = param.detach().clone()
            torch.utils.swap_tensors(param, nn.Parameter(param.detach().to("meta"), param.requires_grad))
    return values


def load_local_shards(model: nn.Module, directory: Path, initial: dict[str, torch.Tensor], device: torch.device):
    """Fill a sharded skeleton: each rank reads from the model's safetensors files only the rows of its own
    shards (``safe_open(...).get_slice``), and takes its rows of ``initial`` (the adapters) from memory. No
    rank ever holds a whole weight, and no weight crosses the process group."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    files = sorted(Path(directory).glob("*.safetensors"))
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    computed = {f"{prefix}.lora_magnitude_vector.{adapter}" for prefix, _, adapter, _ in _dora_layers(model)}
    model.to_empty(device=device)
    state = model.state_dict(keep_vars=True)  # the parameters themselves: a tied head is the embedding's object
    sources = {name: _stored_name(name) for name in state}
    by_tensor: dict[int, str] = {}
    for name, stored in sources.items():
        if stored in where:
            by_tensor.setdefault(id(state[name]), stored)
    rank, world = td.get_rank(), td.get_world_size()
    with torch.no_grad():
        for name, target in state.items():
            local = target.to_local() if isinstance(target, DTensor) else target
            if name in computed:  # DoRA's magnitudes: fill_dora_magnitudes, once every weight is in
                continue
            rows = (slice(None),)
            if isinstance(target, DTensor) and local.dim() > 0:
                rows = (_own_rows(target, local, rank, world),)
            stored = sources[name] if sources[name] in where else by_tensor.get(id(target))  # or a tied head's
            if name in initial:
                local.copy_(initial[name][rows])
            elif stored is None and name in buffers:  # a buffer the files do not hold: the skeleton's own value
                local.copy_(buffers[name])
            else:
                if stored is None:
                    raise ValueError(f"{directory}: no weight for {name} in its safetensors files")
                with safe_open(str(where[stored]), framework="pt") as handle:
                    part = handle.get_slice(stored)[rows[0]] if local.dim() > 0 else handle.get_tensor(stored)
                if tuple(part.shape) != tuple(local.shape):
                    raise ValueError(
                        f"{directory}: {stored} has shape {tuple(part.shape)}, this rank expects {tuple(local.shape)}"
                    )
                local.copy_(part)
        for name, value in buffers.items():  # to_empty left the buffers outside the state dict uninitialised
            if name not in state:
                model.get_buffer(name).copy_(value)


def _own_rows(target: torch.Tensor, local: torch.Tensor, rank: int, world: int) -> slice:
    """The rows of ``target`` (sharded on dim 0, FSDP2's even chunks) that this rank's ``local`` holds."""
    chunk = -(-target.shape[0] // world)
    start = min(rank * chunk, target.shape[0])
    return slice(start, start + local.shape[0])


def _dora_layers(model: nn.Module):
    """(module name, layer, adapter, variant) of every DoRA adapter in ``model``, in module order."""
    for prefix, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            for adapter, variants in layer.variants.items():
                for variant in variants:
                    if isinstance(variant, DoraVariant):
                        yield prefix, layer, adapter, variant


def fill_dora_magnitudes(model: nn.Module) -> None:
    """DoRA's initial magnitudes on a sharded model: ``||W + s B A||`` of whole rows, as one process has them.

    One layer at a time, every rank gathers the layer's weight and A and B (as FSDP does for a forward), computes
    the norms of all rows and keeps the rows of its own shard of the magnitude. The norm cache is turned off: FSDP
    gathers the weights into fresh buffers at every forward, at addresses that recur, with their versions at 0."""
    rank, world = td.get_rank(), td.get_world_size()
    with torch.no_grad():
        for _, layer, adapter, variant in _dora_layers(model):
            variant.cached = False
            weight = layer.base_layer.weight.full_tensor()
            weight = weight.T if layer.fan_in_fan_out else weight
            a, b = layer.lora_A[adapter].weight.full_tensor(), layer.lora_B[adapter].weight.full_tensor()
            norms = row_norms(weight, a, b, layer.scaling[adapter], float_dtype(layer.base_layer))
            local = layer.lora_magnitude_vector[adapter].to_local()
            local.copy_(norms[_own_rows(layer.lora_magnitude_vector[adapter], local, rank, world)])
            del weight, a, b, norms


def _stored_name(name: str) -> str:
    """The name a wrapped layer's weight has in the base model's files (lorakit's wrappers, like PEFT's, keep
    the original under ``base_layer`` / ``original_module``, and a trainable copy under ``modules_to_save``)."""
    for part in (".base_layer.", ".original_module.", ".modules_to_save.default."):
        name = name.replace(part, ".")
    return name


def gathered_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole, on CPU, by parameter name: on rank 0 (every rank must call this; the
    others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds (its shards under FSDP)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


# ----- checkpoints ---------------------------------------------------------------------------------------
_OPTIONS = {"ignore_frozen_params": True, "flatten_optimizer_state_dict": True}


def _tensors_and_rest(model: nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(**_OPTIONS))
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"optimizer.{k}": v for k, v in optimizer_state.items() if isinstance(v, torch.Tensor)})
    rest = {k: v for k, v in optimizer_state.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def save_sharded(
    tmp: Path, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: dict[str, Any]
) -> None:
    """Write this rank's part of a checkpoint into ``tmp`` (every rank calls it; ``tmp`` exists). Rank 0 also
    writes ``trainer_state.json`` with ``state``; the caller renames ``tmp`` into place once all ranks are done."""
    import torch.distributed.checkpoint as dcp

    tensors, rest = _tensors_and_rest(model, optimizer)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
    mine = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    write_safetensors(rng_tensors(mine), tmp / f"rng-rank{rank:05d}.safetensors")
    if rank == 0:
        record = {
            **state,
            "strategy": "fsdp",
            "world_size": td.get_world_size(),
            "optimizer_hyperparameters": jsonable(rest),
            "scheduler": scheduler.state_dict(),
            "python_random": jsonable(random.getstate()),
        }
        (tmp / STATE_JSON).write_text(json.dumps(record))


def load_sharded(path: Path, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore a checkpoint written by ``save_sharded`` (every rank calls it); return the JSON state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = json.loads((path / STATE_JSON).read_text())
    if state.get("world_size") != td.get_world_size():
        raise ValueError(
            f"checkpoint {path} was written by {state.get('world_size')} processes and this run has "
            f"{td.get_world_size()}: resume with --nproc-per-node (x nodes) = {state.get('world_size')}"
        )
    tensors, _ = _tensors_and_rest(model, optimizer)
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDS)))
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optimizer_state = {k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")}
    optimizer_state.update(tupled(state["optimizer_hyperparameters"]))
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
        options=StateDictOptions(**_OPTIONS, strict=False),
    )  # fmt: skip
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(load_file(str(path / f"rng-rank{rank:05d}.safetensors")))
    random.setstate(tupled(state["python_random"]))
    return state


def is_sharded(path: Path) -> bool:
    return (path / SHARDS).is_dir()


def publish(tmp: Path, final: Path, root: Path) -> None:
    """Rank 0, after every rank wrote its part: sync the checkpoint and swap it into place (``durable.swap_in``:
    an existing ``final`` is removed only once the new one is there). ``root``: ``final``'s parent."""
    durable.swap_in(tmp, final)
