"""LoRA wrappers around a frozen base layer, one class per layer type.

           x ──────────────► base_layer (W, frozen) ──┐
           │                                          (+) ──► h = W x + scaling · B (A x)
           └─► dropout ─► A (r × d_in) ─► B (d_out × r) ┘

Each wrapper keeps its adapters by name in ``ModuleDict``s (``lora_A``, ``lora_B``, PEFT's names, so
state-dict keys read ``<path>.lora_A.<adapter>.weight``). Several adapters may be active at once (their
updates add), merged into the base weight, disabled, or routed per batch row. Routing uses one gathered
batched matmul (linear layers) or one masked pass over the concatenated ranks (embeddings, convolutions),
never a Python loop over rows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath
from ._bnb import dequantized_weight, is_quantized, keep_plain_layout, quant_method
from .fastpath import skinny_matmul

try:  # GPT-2 style layers: y = x @ W + b with W stored as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, this only guards odd installs
    Conv1D = None


class Routing:
    """Per-row adapter choice for one forward: ``names[k]`` is adapter k+1; index 0 means the base model.

    A layer may see the batch's rows flattened with their tokens, or otherwise reshaped so that its leading
    dimension is a multiple of the number of rows (OPT's decoder runs its MLP on (rows * tokens, hidden)):
    as long as each row's entries stay together, in row order, ``rows_for`` repeats each row's choice for
    its entries. ``route`` checks the model's own input against the row count, so a multiple seen inside
    is a reshape, never a wrong count.

    ``stacks`` (inference only), when given, keeps each layer's concatenated adapter tensors across forwards
    for the current ``names``: an inference server passes one dict for as long as its adapters' weights stay
    the same, and clears it when they change. Without it nothing is kept (what training needs).
    """

    def __init__(self, names: list[str], index: torch.Tensor, stacks: dict | None = None) -> None:
        self.names = names
        self.key = tuple(names)
        self.index = index
        self.stacks = stacks
        self._masks: dict = {}
        self._rows: dict = {}

    def rows_for(self, lead: int, device: torch.device) -> torch.Tensor:
        """The adapter number of each of ``lead`` leading entries a layer sees (the rows, or their parts)."""
        key = (lead, device)
        if key not in self._rows:
            rows = self.index.shape[0]
            if lead % rows:
                raise ValueError(
                    f"route() was given {rows} row names but the batch has {lead} rows; "
                    "pass one adapter name (or None) per row"
                )
            index = self.index.to(device, non_blocking=True)
            self._rows[key] = index.repeat_interleave(lead // rows) if lead != rows else index
        return self._rows[key]

    def mask(self, layout: tuple, tokens: int, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(entries * tokens, sum of ranks) 0/1 mask keeping each entry's own adapter columns; ``index`` holds
        each leading entry's adapter number and ``layout`` lists (adapter number, rank) in column order.
        Built once per forward for each layout, shape and dtype."""
        key = (layout, index.shape[0], tokens, dtype)
        if key not in self._masks:
            owner = torch.cat([torch.full((r,), k, dtype=torch.long) for k, r in layout]).to(index.device)
            mask = (index[:, None] == owner[None, :]).to(dtype)
            self._masks[key] = mask.repeat_interleave(tokens, dim=0) if tokens > 1 else mask
        return self._masks[key]


class _BaseWrapper(nn.Module):
    """Shared by LoRA layers and modules_to_save wrappers: attribute passthrough to the wrapped module."""

    wrapped_attr = "base_layer"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped_attr:
                raise
            return getattr(getattr(self, self.wrapped_attr), name)


class LoraLayer(_BaseWrapper):
    """Common logic of all LoRA wrappers; subclasses define the adapter tensors and their maths."""

    @staticmethod
    def unsupported_reason(base_layer: nn.Module) -> str | None:
        """Why this wrapper cannot take ``base_layer`` although its type matches (None: it can)."""
        return None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        keep_plain_layout(base_layer)  # a 4-bit base must stay trainable and readable (lorakit._bnb)
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None

    # ----- adapter bookkeeping -------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def in_out(self) -> tuple[int, int]:
        """(d_in, d_out) of the base layer."""
        raise NotImplementedError

    supports_variants = False  # DoRA and PiSSA: linear layers only

    def add_adapter(
        self, name: str, r: int, alpha: float, scaling: float, dropout: float, init: str, use_dora: bool = False
    ) -> None:
        assert name not in self.r, f"adapter {name!r} already on this layer"
        if (use_dora or init == "pissa") and not self.supports_variants:
            raise ValueError(f"DoRA and PiSSA apply to linear layers only, not {type(self.base_layer).__name__}")
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = scaling
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create(name, r)
        self._initialise(name, init)
        weight = self.base_layer.weight
        dtype = _adapter_dtype(self.base_layer)
        for param in self.adapter_parameters(name):
            param.data = param.data.to(device=weight.device, dtype=dtype)
        if init == "pissa":
            self._remember_initial(name)
        if use_dora:
            self._add_magnitude(name)
        self.train(self.training)  # the new dropout and A/B modules follow the layer's mode

    def _remember_initial(self, name: str) -> None:
        raise NotImplementedError

    def _add_magnitude(self, name: str) -> None:
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        assert name not in self.merged_adapters, "unmerge before removing"
        self._forget_variants(name)
        for table in self._tables():
            del table[name]
        del self.lora_dropout[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            del d[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _tables(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        raise NotImplementedError

    def _create(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _initialise(self, name: str, init: str) -> None:
        raise NotImplementedError

    def _forget_variants(self, name: str) -> None:
        """Undo what DoRA or PiSSA added for adapter ``name`` (nothing for plain LoRA)."""

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for table in self._tables():
            entry = table[name]
            params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
        return params

    def uses_dora(self, name: str) -> bool:
        return False

    def uses_pissa(self, name: str) -> bool:
        return False

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's relative key names (no adapter name in the key)."""
        raise NotImplementedError

    # ----- merge ------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B A laid out like ``base_layer.weight``, computed in float32."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, names: Iterable[str]) -> None:
        _refuse_quantized_merge(self.base_layer)
        for name in names:
            if name in self.r and name not in self.merged_adapters:
                self._merge_one(name)
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, names: Iterable[str] | None = None) -> None:
        targets = list(self.merged_adapters if names is None else names)
        for name in reversed(self.merged_adapters[:]):
            if name in targets:
                self._unmerge_one(name)
                self.merged_adapters.remove(name)

    def _merge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.add_(self.delta_weight(name).to(weight.dtype))

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight(name).to(weight.dtype))

    # ----- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.routing is not None:
            if not self.routing.names:  # every row on the base model
                return result
            if self.merged_adapters:
                raise RuntimeError("route() needs unmerged adapters; call lorakit.unmerge(model) first")
            return result + self._routed_update(x, self.routing).to(result.dtype)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = result + self._update(x, name).to(result.dtype)
        return result

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """scaling · B(A(dropout(x))) for one adapter."""
        raise NotImplementedError

    def _routed_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        raise NotImplementedError

    def _row_index(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return routing.rows_for(x.shape[0], x.device)

    def _row_dropout(self, x: torch.Tensor, names: list[str], index: torch.Tensor) -> torch.Tensor:
        """Dropout with each row's own adapter probability (training only)."""
        probs = [0.0] + [_dropout_p(self.lora_dropout[n]) if n in self.r else 0.0 for n in names]
        if not self.training or max(probs) == 0:
            return x
        p = torch.tensor(probs, device=x.device, dtype=x.dtype)[index]
        p = p.view(-1, *([1] * (x.dim() - 1)))
        keep = torch.rand_like(x) >= p
        return x * keep / (1 - p)

    def _present(self, routing: Routing) -> tuple[list[str], tuple[tuple[int, int], ...]]:
        """The routed adapters this layer has, and their (adapter number, rank) layout for ``Routing.mask``."""
        present = [n for n in routing.names if n in self.r]
        return present, tuple((routing.names.index(n) + 1, self.r[n]) for n in present)

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}" for n in self.r]
        return "adapters=[" + "; ".join(parts) + f"], active={self.active_adapters}, merged={self.merged_adapters}"


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters follow the base weight's float dtype; over a quantized base, its compute dtype."""
    weight = base.weight
    if weight.dtype.is_floating_point:
        return weight.dtype
    compute = getattr(base, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) else torch.float32


def _refuse_quantized_merge(base: nn.Module) -> None:
    if is_quantized(base):
        raise ValueError(
            f"cannot merge into a {quant_method(base)}-quantized base weight: it would have to be rounded to "
            f"{quant_method(base)} again, changing the result. Dequantize first (lorakit.quant.dequantize(model)) "
            "to merge in float, or use `lorakit merge --quantize ...`, which does that and reports the drift "
            "re-quantizing would cause"
        )


def _dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def lora_linear_forward(x2, w, bias, a, b, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 W^T + bias + s (x2 A^T) B^T`` for a 2-D ``x2`` and (d_out, d_in) ``w``; returns it and ``x2 A^T``."""
    out = fastpath.linear(x2, w, bias)
    hidden = x2 @ a.T  # (N, r)
    out.addmm_(hidden, b.T, alpha=scaling)
    return out, hidden


def lora_linear_backward(g, x2, hidden, weight, a, b, scaling: float, fan_in_fan_out: bool, need) -> tuple:
    """Gradients of ``lora_linear_forward`` for 2-D ``g``: (x2, weight, bias, a, b), each None unless ``need``
    asks for it. The input gradient is ``g W + (s g B) A`` in one ``addmm``; the frozen W gets none. ``x2`` is
    read only for W's and A's gradients (None is fine without them)."""
    w = weight.T if fan_in_fan_out else weight
    grad_hidden = (g @ b).mul_(scaling) if need[0] or need[3] else None  # (N, r)
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need[0]:
        grad_x = (g @ w).addmm_(grad_hidden, a)
    if need[1]:
        grad_w = g.T @ x2
        grad_w = grad_w.T if fan_in_fan_out else grad_w
    if need[2]:
        grad_bias = g.sum(0)
    if need[3]:
        grad_a = (x2.T @ grad_hidden).T  # this orientation runs 1.2-2x faster on CPU BLAS
    if need[4]:
        grad_b = (g.T @ hidden).mul_(scaling)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T in one function that keeps only x and x A^T for backward.

    The update is added with one ``addmm`` (no separate scaled copy, no extra sum), and backward computes
    the input gradient as ``g W + (s g B) A`` in one ``addmm``. Weight gradients are formed only for tensors
    that require them (the frozen W never gets one).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, fan_in_fan_out: bool):
        x2 = x.reshape(-1, x.shape[-1])
        out, hidden = lora_linear_forward(x2, weight.T if fan_in_fan_out else weight, bias, a, b, scaling)
        ctx.save_for_backward(x2, hidden, weight, a, b)
        ctx.scaling, ctx.fan_in_fan_out, ctx.in_shape, ctx.has_bias = scaling, fan_in_fan_out, x.shape, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, hidden, weight, a, b = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:5])
        need[2] = need[2] and ctx.has_bias
        grads = lora_linear_backward(
            grad.reshape(-1, grad.shape[-1]), x2, hidden, weight, a, b, ctx.scaling, ctx.fan_in_fan_out, need
        )
        grad_x = grads[0].view(ctx.in_shape) if grads[0] is not None else None
        return grad_x, *grads[1:], None, None


class _SharedInputLoraFunction(torch.autograd.Function):
    """The outputs of n LoRA linear layers that read the same x, with one product ``x [A_1; ...; A_n]^T``.

    ``y_i = x W_i^T + b_i + s_i h_i B_i^T`` where ``h = x [A_1; ...; A_n]^T`` and ``h_i`` its columns of
    member i (ranks may differ). Backward sums the input gradient in place, ``g_1 W_1 + ... + g_n W_n +
    [s_1 g_1 B_1, ...] [A_1; ...; A_n]``, and forms ``[A_1; ...]``'s gradient with one product. Keeps x, h
    and the weights for backward, like the single-layer function.
    """

    @staticmethod
    def forward(ctx, x, layout, *tensors):
        ctx.set_materialize_grads(False)
        x2 = x.reshape(-1, x.shape[-1])
        weights, biases, a_list, b_list = tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4]
        a_cat = torch.cat(a_list) if len(a_list) > 1 else a_list[0]
        hidden = x2 @ a_cat.T  # (N, r_1 + ... + r_n)
        outs, start = [], 0
        for (rank, scaling), weight, bias, b in zip(layout, weights, biases, b_list, strict=True):
            out = fastpath.linear(x2, weight, bias)
            out.addmm_(hidden[:, start : start + rank], b.T, alpha=scaling)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += rank
        ctx.save_for_backward(x2, hidden, a_cat, *weights, *b_list)
        ctx.layout, ctx.in_shape, ctx.has_bias = layout, x.shape, [bias is not None for bias in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.layout)
        x2, hidden, a_cat, *rest = ctx.saved_tensors
        weights, b_list = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        grad_x = None
        grad_hidden = []
        member_grads: list = []
        wants_a: list[int] = []  # members whose A needs a gradient (all from one stacked product)
        start = 0
        for i, ((rank, scaling), weight, b, grad) in enumerate(zip(ctx.layout, weights, b_list, grads, strict=True)):
            w_need, bias_need, a_need, b_need = need[2 + 4 * i : 6 + 4 * i]
            if grad is None:  # this member's output was not used
                grad_hidden.append(hidden.new_zeros(hidden.shape[0], rank))
                member_grads += [None, None, None, None]
                start += rank
                continue
            g = grad.reshape(-1, grad.shape[-1])
            grad_hidden.append((g @ b).mul_(scaling))
            if need[0]:
                grad_x = g @ weight if grad_x is None else grad_x.addmm_(g, weight)
            grad_w = g.T @ x2 if w_need else None
            grad_bias = g.sum(0) if ctx.has_bias[i] and bias_need else None
            grad_b = (g.T @ hidden[:, start : start + rank]).mul_(scaling) if b_need else None
            member_grads += [grad_w, grad_bias, None, grad_b]  # A's gradient comes from the stacked product
            if a_need:
                wants_a.append(i)
            start += rank
        grad_hidden = torch.cat(grad_hidden, dim=1) if n > 1 else grad_hidden[0]
        if need[0]:
            grad_x = grad_hidden @ a_cat if grad_x is None else grad_x.addmm_(grad_hidden, a_cat)
            grad_x = grad_x.view(ctx.in_shape)
        if wants_a:
            grad_a = (x2.T @ grad_hidden).T.split([rank for rank, _ in ctx.layout])
            for i in wants_a:
                member_grads[4 * i + 2] = grad_a[i]
        return (grad_x, None, *member_grads)


class SharedInput:
    """LoRA linear layers of one parent that read the same input, such as q/k/v or gate/up projections.

    The first member called with an input computes every member's output at once (one ``x A^T`` product
    against the stacked A matrices, see ``_SharedInputLoraFunction``); the others then pick theirs up when
    the model calls them with that same tensor. Should the model call a member with some other input, or
    skip a member (cross-attention, where k and v read the encoder's states), the group switches itself
    off for good and every member runs on its own. It also steps aside, for that call, whenever some member
    cannot take the fused path (several or merged adapters, dropout in training, mixed dtypes, routing).
    """

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.enabled = True
        self._input: torch.Tensor | None = None
        self._version = -1
        self._pending: dict[int, torch.Tensor] = {}

    def output(self, member: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for ``x``, or None when the member should run on its own."""
        if not self.enabled:
            return None
        if self._pending:
            if self._input is x and _version_of(x) == self._version and id(member) in self._pending:
                out = self._pending.pop(id(member))
                if not self._pending:
                    self._input = None
                return out
            # the previous input's outputs were not all collected: the members do not share one input
            self.enabled = False
            self._pending.clear()
            self._input = None
            return None
        names = [m._fused_adapter(x, (), {}) for m in self.members]
        if None in names:
            return None
        tensors, layout = [], []
        for m, name in zip(self.members, names, strict=True):
            base = m.base_layer
            tensors += [base.weight, base.bias, m.lora_A[name].weight, m.lora_B[name].weight]
            layout.append((m.r[name], m.scaling[name]))
        outs = _SharedInputLoraFunction.apply(x, tuple(layout), *tensors)
        self._pending = {id(m): out for m, out in zip(self.members, outs, strict=True) if m is not member}
        self._input, self._version = x, _version_of(x)
        return outs[self.members.index(member)]


def _version_of(x: torch.Tensor) -> int:
    """In-place modification counter; inference tensors keep none (and cannot change outside inference mode)."""
    return -1 if x.is_inference() else x._version


# Sibling layers that read the same input in common model families (LLaMA, Mistral, Qwen, Gemma, BERT,
# T5, Mixtral experts): grouped by name under one parent.
SHARED_INPUT_NAMES = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("wq", "wk", "wv"),
    ("w1", "w3"),
)


def link_shared_inputs(model: nn.Module) -> int:
    """(Re)build the ``SharedInput`` groups of a model's LoRA linear layers; returns how many groups."""
    count = 0
    for parent in model.modules():
        for names in SHARED_INPUT_NAMES:
            members = [parent._modules.get(n) for n in names]
            members = [m for m in members if type(m) is LoraLinear]
            for m in members:
                m.__dict__.pop("_shared_input", None)
            if len(members) > 1:
                group = SharedInput(members)
                for m in members:
                    m.__dict__["_shared_input"] = group
                count += 1
    return count


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
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # cached ||W + s B A|| per adapter
        self._dora_merged_norms: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            if self.lora_magnitude_vector and not self.disabled and self.routing is None:
                return self._forward_with_dora(x, *args, **kwargs)
            return super().forward(x, *args, **kwargs)
        group = self.__dict__.get("_shared_input")
        if group is not None:
            out = group.output(self, x)
            if out is not None:
                return out
        base = self.base_layer
        return _LoraLinearFunction.apply(
            x,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            self.fan_in_fan_out,
        )

    def _fused_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The one adapter the fused function can run, or None for the general path (several adapters,
        routing, merged or disabled adapters, dropout while training, mixed dtypes, autocast, odd bases)."""
        if args or kwargs or self.disabled or self.routing is not None or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name in self.merged_adapters or type(self.base_layer) not in _FUSABLE_BASES:
            return None
        if name in self.lora_magnitude_vector:
            return None
        if self.training and _dropout_p(self.lora_dropout[name]) > 0:
            return None
        weight = self.base_layer.weight
        if not (x.dtype == weight.dtype == self.lora_A[name].weight.dtype) or torch.is_autocast_enabled():
            return None
        return name

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
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "default":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        elif init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[name])
            nn.init.zeros_(b)
        elif init == "pissa":
            self._pissa(name)
        # "random": keep nn.Linear's own initialisation of both matrices

    # ----- PiSSA ------------------------------------------------------------------------------------------
    def _weight_out_in(self) -> torch.Tensor:
        """The base weight as (d_out, d_in): a view, or for a quantized base its dequantized float copy."""
        if is_quantized(self.base_layer):
            return dequantized_weight(self.base_layer, _adapter_dtype(self.base_layer))
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def _pissa(self, name: str) -> None:
        """A, B from the top-r singular triplets of W; W becomes the residual (PEFT's ``pissa`` init, exactly)."""
        weight = self.base_layer.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"PiSSA needs a float base weight, this layer's is {weight.dtype} (quantized?): add the PiSSA "
                "adapter to the float model, then quantize the residual if you want a quantized base"
            )
        weight = self._weight_out_in()
        r, scaling = self.r[name], self.scaling[name]
        if r > min(weight.shape):
            raise ValueError(f"PiSSA rank r={r} exceeds this layer's min(d_out, d_in) = {min(weight.shape)}; lower r")
        v, s, uh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        a = root[:, None] * uh[:r]
        b = v[:, :r] * root[None, :]
        self.lora_A[name].weight.data = a
        self.lora_B[name].weight.data = b
        weight.copy_((weight.float() - scaling * b @ a).to(weight.dtype))

    def _remember_initial(self, name: str) -> None:
        holder = nn.Module()
        holder.register_buffer("A", self.lora_A[name].weight.detach().clone(), persistent=False)
        holder.register_buffer("B", self.lora_B[name].weight.detach().clone(), persistent=False)
        self.lora_initial[name] = holder

    def uses_pissa(self, name: str) -> bool:
        return name in self.lora_initial

    def initial_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA's A_0 and B_0 (what the base weight had taken out)."""
        holder = self.lora_initial[name]
        return holder.A, holder.B

    # ----- DoRA -------------------------------------------------------------------------------------------
    def _add_magnitude(self, name: str) -> None:
        """DoRA's magnitude starts at the row norms of W + s B A (so the layer starts unchanged)."""
        self.lora_magnitude_vector[name] = nn.Parameter(self._dora_norm(name).clone())

    def uses_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def _dora_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` per output feature, detached; cached until W, A or B change (version counters)."""
        weight, a, b = self.base_layer.weight, self.lora_A[name].weight, self.lora_B[name].weight
        key = (weight.data_ptr(), weight._version, a.data_ptr(), a._version, b.data_ptr(), b._version)
        key += (self.scaling[name], weight.dtype, a.dtype)
        cached = self._dora_norms.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            dtype = _adapter_dtype(self.base_layer)
            combined = self._weight_out_in().to(dtype) + self.scaling[name] * (b @ a).to(dtype)
            norm = torch.linalg.norm(combined, dim=1).to(dtype)
        self._dora_norms[name] = (key, norm)
        return norm

    def _forward_with_dora(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            if name not in self.lora_magnitude_vector:
                result = result + self._update(x, name).to(result.dtype)
                continue
            result = result + self._dora_update(x, name, result)
        return result

    def _dora_update(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``(m/||W + s B A|| - 1) W x + (m/||W + s B A||) s B A x``, added to the base output (PEFT's order)."""
        a, b = self.lora_A[name], self.lora_B[name]
        x = x.to(a.weight.dtype) if x.dtype != a.weight.dtype else x
        dropout = self.lora_dropout[name]
        bias = self.base_layer.bias
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result - bias if bias is not None else result
        else:
            x = dropout(x)
            base_result = F.linear(x, self._weight_out_in())
        scale = (self.lora_magnitude_vector[name] / self._dora_norm(name)).view(1, -1)
        lora = b(a(x))
        return (scale - 1) * base_result + scale * lora * self.scaling[name]

    def _merge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super()._merge_one(name)
        weight = self.base_layer.weight  # DoRA: W' = m / ||W + s B A|| * (W + s B A)
        norm = self._dora_norm(name).float()
        factor = self.lora_magnitude_vector[name].float() / norm
        factor = factor[None, :] if self.fan_in_fan_out else factor[:, None]
        weight.copy_((factor * (weight.float() + self.delta_weight(name))).to(weight.dtype))
        self._dora_merged_norms[name] = norm

    def _unmerge_one(self, name: str) -> None:
        if name not in self._dora_merged_norms:
            return super()._unmerge_one(name)
        weight = self.base_layer.weight
        factor = self.lora_magnitude_vector[name].float() / self._dora_merged_norms.pop(name)
        factor = factor[None, :] if self.fan_in_fan_out else factor[:, None]
        weight.copy_((weight.float() / factor - self.delta_weight(name)).to(weight.dtype))

    @torch.no_grad()
    def _forget_variants(self, name: str) -> None:
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self._dora_norms.pop(name, None)
        if name in self.lora_initial:  # PiSSA: give the base weight back what the adapter had taken out
            a0, b0 = self.initial_factors(name)
            weight = self._weight_out_in()
            weight.copy_((weight.float() + self.scaling[name] * b0.float() @ a0.float()).to(weight.dtype))
            del self.lora_initial[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = super().adapter_parameters(name)
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name]
        x = x.to(a.weight.dtype) if x.dtype != a.weight.dtype else x
        return self.lora_B[name](a(self.lora_dropout[name](x))) * self.scaling[name]

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

    def _routed_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        dora = [n for n in routing.names if n in self.lora_magnitude_vector]
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
        xs = x.to(a_stack.dtype).reshape(x.shape[0], -1, x.shape[-1])
        xs = self._row_dropout(xs, routing.names, index)
        hidden = torch.bmm(xs, a_stack.index_select(0, index).transpose(1, 2))  # (rows, tokens, r_max)
        out = torch.bmm(hidden, b_stack.index_select(0, index).transpose(1, 2))  # (rows, tokens, d_out)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _routed_concat(self, x: torch.Tensor, routing: Routing, index: torch.Tensor) -> torch.Tensor:
        """Inference routing without per-row copies: x @ [A_1; ...; A_n]^T, each row masked to its own adapter's
        rank columns, then @ [s_1 B_1^T; ...; s_n B_n^T]. The concatenations are built once per set of names and
        kept in ``routing.stacks``; the row mask is built once per forward and rank layout."""
        entry = routing.stacks.get(id(self))
        if entry is None or entry[0] != routing.key:
            present, layout = self._present(routing)
            a_cat = torch.cat([self.lora_A[n].weight for n in present]).detach()  # (R, d_in)
            b_cat = torch.cat([(self.lora_B[n].weight * self.scaling[n]).T for n in present]).contiguous().detach()
            entry = (routing.key, a_cat.contiguous(), b_cat.T.contiguous(), layout)
            routing.stacks[id(self)] = entry
        _, a_cat, b_cat_t, layout = entry
        tokens = x.numel() // (x.shape[0] * x.shape[-1])
        mask = routing.mask(layout, tokens, index, a_cat.dtype)
        hidden = skinny_matmul(x.reshape(-1, x.shape[-1]).to(a_cat.dtype), a_cat)  # (rows * tokens, R)
        hidden = hidden * mask
        return skinny_matmul(hidden, b_cat_t).reshape(*x.shape[:-1], b_cat_t.shape[0])

    def _first(self, names: list[str]) -> str:
        return next(n for n in names if n in self.r)


class LoraConv1D(LoraLinear):
    """LoRA for transformers' GPT-2 ``Conv1D`` (weight stored transposed: d_in x d_out)."""

    fan_in_fan_out = True


_FUSABLE_BASES = (nn.Linear, Conv1D) if Conv1D is not None else (nn.Linear,)


class LoraEmbedding(LoraLayer):
    """LoRA for ``nn.Embedding``: A is (r x num_embeddings) looked up by token id, B is (dim x r)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @property
    def in_out(self) -> tuple[int, int]:
        return self.base_layer.num_embeddings, self.base_layer.embedding_dim

    def _tables(self):
        return [self.lora_embedding_A, self.lora_embedding_B]

    def _create(self, name: str, r: int) -> None:
        num, dim = self.in_out
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r))

    def _initialise(self, name: str, init: str) -> None:
        # PEFT's convention for embeddings: A zero, B normal (the update starts at zero either way).
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if init == "random":
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)
        nn.init.normal_(b)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {
            "lora_embedding_A": self.lora_embedding_A[name],
            "lora_embedding_B": self.lora_embedding_B[name],
        }

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_embedding_A[name].float()
        b = self.lora_embedding_B[name].float()
        return (b @ a).T * self.scaling[name]

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        hidden = self._lookup(x, self.lora_embedding_A[name].T)
        return (hidden @ self.lora_embedding_B[name].T) * self.scaling[name]

    def _routed_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        index = self._row_index(x, routing)
        present, layout = self._present(routing)
        if not present:
            return self.base_layer.weight.new_zeros(*x.shape, self.in_out[1])
        a_cat = torch.cat([self.lora_embedding_A[n] for n in present])  # (sum r, num)
        b_cat = torch.cat([self.lora_embedding_B[n] * self.scaling[n] for n in present], dim=1)
        hidden = self._lookup(x, a_cat.T)  # (rows, ..., sum r)
        mask = routing.mask(layout, 1, index, hidden.dtype)
        hidden = hidden * mask.view(mask.shape[0], *([1] * (hidden.dim() - 2)), mask.shape[1])
        return hidden @ b_cat.T


class LoraConv2d(LoraLayer):
    """LoRA for ``nn.Conv2d``: A is a conv with the base kernel into r channels, B a 1x1 conv to d_out."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        assert self.unsupported_reason(base_layer) is None
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @staticmethod
    def unsupported_reason(base_layer: nn.Conv2d) -> str | None:
        if base_layer.groups != 1 or base_layer.dilation != (1, 1):
            return (
                f"LoRA supports Conv2d with groups=1 and dilation=1, got groups={base_layer.groups}, "
                f"dilation={base_layer.dilation}; leave it out with exclude_modules"
            )
        return None

    @property
    def in_out(self) -> tuple[int, int]:
        return self.base_layer.in_channels, self.base_layer.out_channels

    def _tables(self):
        return [self.lora_A, self.lora_B]

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, (1, 1), (1, 1), bias=False)

    _initialise = LoraLinear._initialise
    adapter_state = LoraLinear.adapter_state

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()  # (r, in, kh, kw)
        b = self.lora_B[name].weight.float()  # (out, r, 1, 1)
        if a.shape[2:] == (1, 1):
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], a.shape[1], 1, 1)
        else:
            delta = F.conv2d(a.transpose(0, 1), b).transpose(0, 1)
        return delta * self.scaling[name]

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name]
        x = x.to(a.weight.dtype) if x.dtype != a.weight.dtype else x
        return self.lora_B[name](a(self.lora_dropout[name](x))) * self.scaling[name]

    def _routed_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        index = self._row_index(x, routing)
        present, layout = self._present(routing)
        if not present:
            return torch.zeros_like(self.base_layer(x))
        base = self.base_layer
        a_cat = torch.cat([self.lora_A[n].weight for n in present])
        b_cat = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in present], dim=1)
        xs = self._row_dropout(x.to(a_cat.dtype), routing.names, index)
        hidden = F.conv2d(xs, a_cat, None, base.stride, base.padding)
        hidden = hidden * routing.mask(layout, 1, index, hidden.dtype)[:, :, None, None]
        return F.conv2d(hidden, b_cat)


class ModulesToSave(_BaseWrapper):
    """A frozen original module plus one trainable copy per adapter (PEFT's ``modules_to_save``)."""

    wrapped_attr = "original_module"

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict(keep_vars=True))

    def forward(self, x, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.routing is not None:
            return self._routed(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.modules_to_save]
        if len(names) > 1:
            raise RuntimeError(f"adapters {names} each carry their own copy of this module; activate only one of them")
        module = self.modules_to_save[names[0]] if names else self.original_module
        return module(x, *args, **kwargs)

    def _routed(self, x, *args, **kwargs):
        routing = self.routing
        result = self.original_module(x, *args, **kwargs)
        if not isinstance(result, torch.Tensor):
            raise TypeError("route() supports modules_to_save modules that return a single tensor")
        index = routing.rows_for(result.shape[0], result.device)
        for k, name in enumerate(routing.names, start=1):
            if name in self.modules_to_save and bool((index == k).any()):
                rows = (index == k).view(-1, *([1] * (result.dim() - 1)))
                result = torch.where(rows, self.modules_to_save[name](x, *args, **kwargs), result)
        return result


def wrapper_classes() -> list[tuple[type[nn.Module], type[LoraLayer]]]:
    """The dispatch table, in order: the first base type that matches picks the wrapper."""
    table: list[tuple[type[nn.Module], type[LoraLayer]]] = [
        (nn.Embedding, LoraEmbedding),
        (nn.Conv2d, LoraConv2d),
        (nn.Linear, LoraLinear),
    ]
    if Conv1D is not None:
        table.insert(0, (Conv1D, LoraConv1D))
    return table


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2 Conv1D, wrapped or not: what ``all-linear`` targets."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))
