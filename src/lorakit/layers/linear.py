"""LoRA for linear layers: ``nn.Linear`` (and quantized linears) and transformers' GPT-2 ``Conv1D``.

``LoraLinear.forward`` is the reference maths of ``LoraLayer.forward`` plus one fast path: when exactly one
plain adapter is active and unmerged (no routing, no dropout while training), the layer runs
``LoraLinearFunction`` (``lorakit.layers.kernels``), or takes its output from its shared-input group
(``lorakit.layers.shared``). ``fast_path_adapter`` says when; tests check both paths agree.

The fast path computes in one dtype: the common dtype of x, W, the bias, A and B, or under ``torch.autocast``
autocast's dtype, to which it casts them all (a bf16 base with float32 adapters in bf16-mixed training); with
mixed dtypes outside autocast the reference maths run (the update in the adapter's dtype, cast back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._bnb import dequantized_weight, float_dtype, is_quantized
from ..fastpath import skinny_matmul
from ..precision import autocast_dtype, autocast_off, fast_path_dtype
from .base import LoraLayer, dropout_p, init_factors
from .kernels import LoraLinearFunction, apply_in
from .routing import Routing

try:  # GPT-2 style layers: y = x @ W + b with W stored as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, this only guards odd installs
    Conv1D = None

SMALL_ROUTED_PRODUCT = 256
"""Rows x total rank at or below which routed float32 adapters multiply in float32 on a CPU, under autocast too:
one decode row at rank 16 runs 6.6 us in float32 against 31.7 us in bf16 (576 x 576), eight rows on eight
adapters (rank 128 in all) 57.7 us against 49.4 us."""

FAST_PATH_BASES = (nn.Linear, Conv1D) if Conv1D is not None else (nn.Linear,)


class LoraLinear(LoraLayer):
    """LoRA for ``nn.Linear`` (weight d_out x d_in)."""

    fan_in_fan_out = False
    supports_variants = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: one magnitude per output feature (PEFT's name)
        self.lora_initial = nn.ModuleDict()  # PiSSA: the initial A and B, to convert to plain LoRA on save
        self.shared_input = None  # a SharedInput group when siblings read the same input (link_shared_inputs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self.fast_path_adapter(x, args, kwargs)
        if plan is None:
            return super().forward(x, *args, **kwargs)  # the reference maths
        return self.fast_path(x, *plan)

    def fast_path_adapter(self, x: torch.Tensor, args, kwargs) -> tuple[str, torch.dtype] | None:
        """The one adapter the fast path can run and the dtype it runs in (``precision.fast_path_dtype``), or None
        for the reference path (several adapters, routing, merged or disabled adapters, a variant, dropout while
        training, mixed dtypes outside autocast)."""
        if args or kwargs or self.disabled or self.routing is not None or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name in self.merged_adapters or type(self.base_layer) not in FAST_PATH_BASES:
            return None
        if self.output_variant(name) is not None:
            return None
        if self.training and dropout_p(self.lora_dropout[name]) > 0:
            return None
        base = self.base_layer
        dtype = fast_path_dtype(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight)
        return None if dtype is None else (name, dtype)

    def fast_path(self, x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``W x + b + s B A x`` for adapter ``name`` in ``dtype`` by one autograd function (or the shared-input
        group)."""
        if self.shared_input is not None:
            out = self.shared_input.output(self, x)
            if out is not None:
                return out
        base = self.base_layer
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return apply_in(
            LoraLinearFunction, dtype, x, base.weight, base.bias, a, b, self.scaling[name], self.fan_in_fan_out
        )

    @property
    def in_out(self) -> tuple[int, int]:
        base = self.base_layer
        if not self.fan_in_fan_out and hasattr(base, "in_features"):  # also right for packed quantized weights
            return base.in_features, base.out_features
        w = base.weight
        return (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])

    def _tables(self):
        return [self.lora_A, self.lora_B]

    def _create(self, name: str, r: int) -> None:
        d_in, d_out = self.in_out
        self.lora_A[name] = nn.Linear(d_in, r, bias=False)
        self.lora_B[name] = nn.Linear(r, d_out, bias=False)

    def _initialise(self, name: str, init: str) -> None:
        init_factors(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as (d_out, d_in): a view, or for a quantized base its dequantized float copy."""
        if is_quantized(self.base_layer):
            return dequantized_weight(self.base_layer, float_dtype(self.base_layer))
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def _own_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name]
        x = self.adapter_input(x, a.weight.dtype)
        return self.lora_B[name](a(self.lora_dropout[name](x))) * self.scaling[name]

    # ----- routing: one adapter per row ------------------------------------------------------------------
    def _routed_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        dora = [n for n in routing.names if n in self.r and self.output_variant(n) is not None]
        if dora:
            raise ValueError(
                f"route() does not support DoRA adapters ({', '.join(dora)}): DoRA rescales the base output per "
                "adapter; activate one DoRA adapter at a time with set_active, or merge it"
            )
        index = self._row_index(x, routing)
        if not any(n in self.r for n in routing.names):
            return x.new_zeros(*x.shape[:-1], self.in_out[1])
        if routing.stacks is not None and not self.training:
            return self._routed_concat(x, routing, index)
        a_stack, b_stack = self._stacked(routing.names, self.lora_A[self._first(routing.names)].weight)
        xs = self.adapter_input(x, a_stack.dtype).reshape(x.shape[0], -1, x.shape[-1])
        xs = self._row_dropout(xs, routing.names, index)
        hidden = torch.bmm(xs, a_stack.index_select(0, index).transpose(1, 2))  # (rows, tokens, r_max)
        out = torch.bmm(hidden, b_stack.index_select(0, index).transpose(1, 2))  # (rows, tokens, d_out)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _stacked(self, names: list[str], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A: (n+1, r_max, d_in) and B: (n+1, d_out, r_max) with scaling folded into B; slot 0 is zeros."""
        d_in, d_out = self.in_out
        r_max = max([self.r[n] for n in names if n in self.r], default=1)
        a_rows = [like.new_zeros(r_max, d_in)]
        b_rows = [like.new_zeros(d_out, r_max)]
        for n in names:
            if n not in self.r:
                a_rows.append(like.new_zeros(r_max, d_in))
                b_rows.append(like.new_zeros(d_out, r_max))
                continue
            pad = r_max - self.r[n]
            a_rows.append(F.pad(self.lora_A[n].weight, (0, 0, 0, pad)))
            b_rows.append(F.pad(self.lora_B[n].weight * self.scaling[n], (0, pad)))
        return torch.stack(a_rows), torch.stack(b_rows)

    def _routed_concat(self, x: torch.Tensor, routing: Routing, index: torch.Tensor) -> torch.Tensor:
        """Inference routing without per-row copies: x @ [A_1; ...; A_n]^T, each row masked to its own adapter's
        rank columns, then @ [s_1 B_1^T; ...; s_n B_n^T]. The concatenations are built once per set of names and
        compute dtype (the adapters', or autocast's on a GPU) and kept in ``routing.stacks``; the row mask is built once
        per forward and rank layout."""
        own = self.lora_A[self._first(routing.names)].weight.dtype
        dtype = autocast_dtype(x.device.type) or own
        if x.device.type == "cpu" and own == torch.float32 and dtype != own:
            rank = sum(self.r[n] for n in routing.names if n in self.r)
            if (x.numel() // x.shape[-1]) * rank <= SMALL_ROUTED_PRODUCT:
                dtype = own  # tiny products: float32 is 3-4x faster than bf16 on a CPU (BENCHMARKS.md, serving)
        entry = routing.stacks.get(id(self))
        if entry is None or entry[0] != routing.key or entry[1].dtype != dtype:
            present, layout = self._present(routing)
            a_cat = torch.cat([self.lora_A[n].weight for n in present]).detach()  # (R, d_in)
            b_cat = torch.cat([(self.lora_B[n].weight * self.scaling[n]).T for n in present]).detach()
            entry = (routing.key, a_cat.to(dtype).contiguous(), b_cat.T.to(dtype).contiguous(), layout)
            routing.stacks[id(self)] = entry
        _, a_cat, b_cat_t, layout = entry
        tokens = x.numel() // (x.shape[0] * x.shape[-1])
        mask = routing.mask(layout, tokens, index, dtype)
        with autocast_off(x.device.type):  # the stacks are in autocast's dtype already
            hidden = skinny_matmul(x.reshape(-1, x.shape[-1]).to(dtype), a_cat)  # (rows * tokens, R)
            if mask is not None:  # None: every row on the one adapter present
                hidden = hidden * mask
            return skinny_matmul(hidden, b_cat_t).reshape(*x.shape[:-1], b_cat_t.shape[0])

    def _first(self, names: list[str]) -> str:
        return next(n for n in names if n in self.r)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.shared_input is not None and self.shared_input.enabled:
            text += f", shared input with {self.shared_input.describe(self)}"
        return text


class LoraConv1D(LoraLinear):
    """LoRA for transformers' GPT-2 ``Conv1D`` (weight stored transposed: d_in x d_out)."""

    fan_in_fan_out = True
