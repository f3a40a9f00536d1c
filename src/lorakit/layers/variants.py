"""LoRA variants as small objects: what DoRA and PiSSA change in one adapter of a linear layer.

A variant has its own ``init`` (after A and B exist), ``forward`` and ``merge`` / ``unmerge`` (only those
with ``changes_output``), and ``forget`` (undo what ``init`` did when the adapter goes). Their tensors live
in the layer's own dictionaries under PEFT's names (``lora_magnitude_vector``; PiSSA's initial factors in
``lora_initial``, not saved), so ``state_dict``, ``.to()`` and optimizers see them like any parameter.

- DoRA (Liu et al. 2024): ``W' = m · (W + s B A) / ||W + s B A||`` row-wise, with the magnitude ``m``
  trained; it starts at the row norms, so the layer starts unchanged. The norm is computed in float32 (at
  least) and kept in the adapter's dtype, like ``m``; the output comes back in the base output's dtype (also
  under ``torch.autocast``, where the products run in autocast's dtype and the rescaling in the adapter's).
- PiSSA (Meng et al. 2024): A and B start as the top-r singular triplets of W, and W keeps the residual;
  saved as plain LoRA for the original base (``lorakit.io``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..precision import autocast_dtype, autocast_off, cast


class LoraVariant:
    """Plain LoRA's behaviour; a variant overrides the parts it changes."""

    name = "lora"
    changes_output = False  # True: forward, merge and unmerge are the variant's own

    def init(self, layer, adapter: str) -> None:
        """Called once A and B exist, in the adapter's dtype and device."""

    def forward(self, layer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + layer._update(x, adapter).to(result.dtype)

    def merge(self, layer, adapter: str) -> None:
        raise NotImplementedError

    def unmerge(self, layer, adapter: str) -> None:
        raise NotImplementedError

    def forget(self, layer, adapter: str) -> None:
        """Undo ``init`` (the adapter is being removed, or the model unloaded without merging)."""

    def parameters(self, layer, adapter: str) -> list[nn.Parameter]:
        return []

    def state(self, layer, adapter: str) -> dict[str, torch.Tensor]:
        """Tensors saved with the adapter, under PEFT's relative key names."""
        return {}


def variants_for(init: str, use_dora: bool) -> list[LoraVariant]:
    """The variants of an adapter with this init and DoRA setting, in the order their ``init`` runs."""
    found: list[LoraVariant] = []
    if init == "pissa":
        found.append(PissaVariant())
    if use_dora:
        found.append(DoraVariant())
    return found


_optimizer_steps = 0  # steps taken by any torch.optim optimizer in this process: part of DoRA's norm cache key
_watching = False


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _watch_optimizers() -> None:
    """Count every optimizer step (a global post-step hook, registered once). Fused AdamW updates parameters
    without moving their version counters, so versions alone would keep a norm from before the step."""
    global _watching
    if not _watching:
        register_optimizer_step_post_hook(_count_step)
        _watching = True


def row_norms(weight_out_in: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, dtype) -> torch.Tensor:
    """DoRA's ``||W + s B A||`` per output feature (W as d_out x d_in), detached: computed in float32 (float64
    for float64 tensors), also under autocast, and returned in ``dtype``."""
    work = torch.promote_types(torch.promote_types(a.dtype, dtype), torch.float32)
    with torch.no_grad(), autocast_off(a.device.type):
        combined = weight_out_in.to(work) + scaling * (b.to(work) @ a.to(work))
        return torch.linalg.norm(combined, dim=1).to(dtype)


class DoraVariant(LoraVariant):
    """Weight-decomposed LoRA: a trained magnitude per output feature over the normalised direction."""

    name = "dora"
    changes_output = True

    def __init__(self) -> None:
        self._norm: tuple[tuple, torch.Tensor] | None = None  # ||W + s B A|| and the versions it was built from
        self._merged_norm: torch.Tensor | None = None
        # The cache is keyed by storage addresses, version counters and optimizer steps. FSDP gathers the
        # weights into fresh buffers at every forward, at addresses that recur, with their versions at 0: a
        # sharded model turns the cache off.
        self.cached = True
        _watch_optimizers()

    def init(self, layer, adapter: str) -> None:
        weight = layer.base_layer.weight
        if weight.is_meta:  # a skeleton (sharded training): lorakit.train.fsdp fills it once the weights are in
            d_out = layer.in_out[1]
            empty = torch.empty(d_out, device="meta", dtype=layer.lora_A[adapter].weight.dtype)
            layer.lora_magnitude_vector[adapter] = nn.Parameter(empty)
            return
        layer.lora_magnitude_vector[adapter] = nn.Parameter(self.norm(layer, adapter).clone())

    def norm(self, layer, adapter: str) -> torch.Tensor:
        """``||W + s B A||`` per output feature in the adapter's dtype, detached; cached until W, A or B change
        (version counters) or an optimizer steps."""
        weight, a, b = layer.base_layer.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        key = (weight.data_ptr(), weight._version, a.data_ptr(), a._version, b.data_ptr(), b._version)
        key += (layer.scaling[adapter], weight.dtype, a.dtype, _optimizer_steps)
        if self.cached and self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        norm = row_norms(layer.weight_out_in(), a, b, layer.scaling[adapter], a.dtype)
        self._norm = (key, norm) if self.cached else None
        return norm

    def forward(self, layer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The base output plus ``(k - 1) W x' + k s B A x'`` with ``k = m / ||W + s B A||`` and ``x'`` the
        input after dropout (PEFT's DoRA), written as ``k (W x' + s B A x')`` beside what stays: autograd then
        keeps one (tokens x d_out) tensor per layer for the gradients of ``m`` instead of two. Returned in
        ``result``'s dtype (``k`` is in the adapter's, float32 over a bf16 base)."""
        return self._rescaled(layer, adapter, x, result).to(result.dtype)

    def _rescaled(self, layer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a, b = layer.lora_A[adapter], layer.lora_B[adapter]
        x = layer.adapter_input(x, a.weight.dtype)
        dropout = layer.lora_dropout[adapter]
        bias = layer.base_layer.bias
        scale = (layer.lora_magnitude_vector[adapter] / self.norm(layer, adapter)).view(1, -1)
        if isinstance(dropout, nn.Identity) or not layer.training:
            lora = b(a(x))
            if bias is None:  # the whole output is W x, rescaled
                return scale * (result + lora * layer.scaling[adapter])
            return bias + scale * (result - bias + lora * layer.scaling[adapter])
        x = dropout(x)
        weight = layer.weight_out_in()
        if autocast_dtype(x.device.type) is None:  # the product in x's (the adapter's) dtype; autocast casts both
            weight = cast(weight, x.dtype)
        base_result = F.linear(x, weight)
        lora = b(a(x))
        return (result - base_result) + scale * (base_result + lora * layer.scaling[adapter])

    def _factor(self, layer, adapter: str, norm: torch.Tensor) -> torch.Tensor:
        factor = layer.lora_magnitude_vector[adapter].float() / norm
        return factor[None, :] if layer.fan_in_fan_out else factor[:, None]

    def merge(self, layer, adapter: str) -> None:
        weight = layer.base_layer.weight  # W' = m / ||W + s B A|| * (W + s B A)
        norm = self.norm(layer, adapter).float()
        merged = self._factor(layer, adapter, norm) * (weight.float() + layer.delta_weight(adapter))
        weight.copy_(merged.to(weight.dtype))
        self._merged_norm = norm

    def unmerge(self, layer, adapter: str) -> None:
        weight = layer.base_layer.weight
        factor = self._factor(layer, adapter, self._merged_norm)
        self._merged_norm = None
        weight.copy_((weight.float() / factor - layer.delta_weight(adapter)).to(weight.dtype))

    def forget(self, layer, adapter: str) -> None:
        if adapter in layer.lora_magnitude_vector:
            del layer.lora_magnitude_vector[adapter]
        self._norm = None

    def parameters(self, layer, adapter: str) -> list[nn.Parameter]:
        return [layer.lora_magnitude_vector[adapter]]

    def state(self, layer, adapter: str) -> dict[str, torch.Tensor]:
        return {"lora_magnitude_vector": layer.lora_magnitude_vector[adapter]}


class PissaVariant(LoraVariant):
    """A and B from W's principal singular directions; W keeps the residual (PEFT's ``pissa`` init, exactly)."""

    name = "pissa"

    @torch.no_grad()
    def init(self, layer, adapter: str) -> None:
        weight = layer.base_layer.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"PiSSA needs a float base weight, this layer's is {weight.dtype} (quantized?): add the PiSSA "
                "adapter to the float model, then quantize the residual if you want a quantized base"
            )
        weight = layer.weight_out_in()
        r, scaling = layer.r[adapter], layer.scaling[adapter]
        if r > min(weight.shape):
            raise ValueError(f"PiSSA rank r={r} exceeds this layer's min(d_out, d_in) = {min(weight.shape)}; lower r")
        v, s, uh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        a = root[:, None] * uh[:r]
        b = v[:, :r] * root[None, :]
        weight.copy_((weight.float() - scaling * b @ a).to(weight.dtype))
        a_param, b_param = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        a_param.data = a.to(a_param.dtype)
        b_param.data = b.to(b_param.dtype)
        holder = nn.Module()  # the initial factors, to save the trained adapter as plain LoRA
        holder.register_buffer("A", a_param.detach().clone(), persistent=False)
        holder.register_buffer("B", b_param.detach().clone(), persistent=False)
        layer.lora_initial[adapter] = holder

    def initial_factors(self, layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A_0 and B_0: what the base weight had taken out."""
        holder = layer.lora_initial[adapter]
        return holder.A, holder.B

    @torch.no_grad()
    def forget(self, layer, adapter: str) -> None:
        """Give the base weight back what the adapter had taken out."""
        a0, b0 = self.initial_factors(layer, adapter)
        weight = layer.weight_out_in()
        weight.copy_((weight.float() + layer.scaling[adapter] * b0.float() @ a0.float()).to(weight.dtype))
        del layer.lora_initial[adapter]
