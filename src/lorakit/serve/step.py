"""The serving engine's own decode step for LLaMA-family models: one token for every running row, adapters routed
per row, without the model's per-module Python.

A decode step of a small model on a CPU is made of hundreds of tiny operations: on the embedded SmolLM2-135M
(30 layers, 7 linear layers each) the model's own forward spends about as long in Python between the products
as in the products themselves, and a routed adapter adds two more products and their bookkeeping to each of the
210 linear layers. This step computes the same maths with fewer, larger operations:

- the linear layers that read the same input form a group (q/k/v; gate/up; o; down; the head): one base product
  over the group's weights, concatenated once (int8 weights and their per-channel scales, or float weights),
  and its adapters applied one of two ways. Few adapters for the rows (one stream; many rows on a few
  adapters): one product ``x [A_1; ...; A_n]^T`` with every member's and every adapter's A stacked, a 0/1 mask
  keeping each row's own adapter's columns (none when every row is on the one adapter there is), then one
  product per member with its adapters' B side by side, the scalings folded in. Many different adapters (at
  least half as many as rows, up to ``PER_ROW_MAX`` rows): each row's own A and B gathered once per assignment
  of adapters to rows and applied in batched float32 products (``torch.bmm``), with none of the masked
  product's arithmetic for other rows' adapters;
- RMS norm as one ``F.rms_norm`` in float32 (transformers' ``LlamaRMSNorm`` maths), the rotary embedding from
  the model's own ``rotary_emb`` once per step and applied to q and k at once, attention over the engine's
  preallocated KV buffers (``serve.kv.SlotKV``), written in place: ``F.scaled_dot_product_attention`` for one
  row, two products and a float32 softmax for several (grouped heads without repeating keys and values);
- the dtypes of the model's forward under the precision: the residual stream in the embeddings' dtype, base
  products in their weights' dtype (int8 weights: bf16 activations), adapters in autocast's dtype, or in
  float32 for float32 adapters on a CPU when the product is small (``layers.linear.SMALL_ROUTED_PRODUCT``, as
  the routed layers do).

The concatenated base weights replace the members' own: each member's weight (and scale, and bias) becomes a
view of its rows of the group's tensor, so the model keeps one copy and its own forward (prefill, and any step
this one declines) reads the same memory.

``DecodeStep.build(model)`` returns the step, or None and the reason (an architecture other than llama, mistral
and qwen2; adapters on other layers, ``modules_to_save`` copies, merged or disabled adapters, DoRA; quantized
bases other than ``lorakit.weights``' int8): the engine then decodes with the model's own forward and says why.
A step also declines (returns None) when the KV cache is longer than a sliding attention window.
Checked against the model's own forward, routed rows of several adapters and the base, in float32, bf16-mixed
and int8 weights (tests/test_serve_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..fastpath import skinny_matmul
from ..layers import LoraLayer, ModulesToSave
from ..layers.linear import SMALL_ROUTED_PRODUCT, LoraLinear
from ..layers.routing import Routing
from ..weights import Int8Linear
from .kv import SlotKV

PER_ROW_MAX = 16
"""Most rows for which a step gives every row its own copy of its adapter's A and B (``_Group._per_row``): the
copies cost one adapter's float32 size per row."""

ARCHITECTURES = ("llama", "mistral", "qwen2")
"""``config.model_type`` values whose decoder layer this step reproduces: pre-norm RMS norm, rotary q/k/v
attention (q/k/v biases allowed), a SiLU-gated MLP, a final norm and a linear head."""


@dataclass
class _Stack:
    """One group's adapters for one set of routed names and dtype: every member's A of every adapter stacked
    (R, d_in), which adapter owns which of the R columns, and per member its B matrices side by side
    (d_out, R_j) with the columns they read."""

    a: torch.Tensor
    layout: tuple[tuple[int, int], ...]  # (adapter number, rank) of the R columns in order: ``Routing.mask``'s form
    b: list[tuple[int, int, torch.Tensor, int, int]]  # (first output, end output, B, first column, end column)
    rank: int  # the largest sum of ranks over the group's members: the routed layers' small-product test


class _Group:
    """Linear layers reading the same input (see the module docstring): their base weights concatenated (the
    members' own weights become views of it), their adapters stacked per set of routed names."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.bases = [_base(m) for m in members]
        self.sizes = [b.out_features for b in self.bases]
        self.starts = [sum(self.sizes[:j]) for j in range(len(self.sizes))]  # each member's first output column
        self.int8 = isinstance(self.bases[0], Int8Linear)
        self.weight = _fuse(self.bases, "weight")
        self.scale = _fuse(self.bases, "scale") if self.int8 else None
        self.bias = _fuse(self.bases, "bias") if any(b.bias is not None for b in self.bases) else None
        self._stacks: dict = {}
        self._row_stacks: dict = {}

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The members' base outputs side by side, (rows, sum of out features)."""
        if self.int8:
            out = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight, self.scale)
        else:
            out = skinny_matmul(x.to(self.weight.dtype), self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def __call__(self, x: torch.Tensor, route: _Route) -> torch.Tensor:
        """The members' outputs side by side, (rows, sum of out features): base plus each row's own adapter."""
        out = self.base(x)
        if route.names and route.per_row:
            return self._per_row(x, route, out)
        stack = self._stack(route, x) if route.names else None
        if stack is None:
            return out
        hidden = x.to(stack.a.dtype) @ stack.a.T
        mask = route.mask(stack.layout, 1, route.index, stack.a.dtype)
        if mask is not None:
            hidden = hidden * mask
        for start_out, end_out, b, start, end in stack.b:  # each member's B alone: a block-diagonal B reads zeros
            out[:, start_out:end_out] += (hidden[:, start:end] @ b.T).to(out.dtype)
        return out

    def _per_row(self, x: torch.Tensor, route: _Route, out: torch.Tensor) -> torch.Tensor:
        """Each row times its own adapter's A and B in two batched float32 products (``torch.bmm``, one matrix per
        row): for rows on mostly different adapters this does none of the masked product's arithmetic for other
        rows' adapters, and float32's batched one-row products run 1.6x faster than bf16's masked ones on a CPU
        (eight rows on eight adapters, 30 layers: 7.9 against 13.1 ms). The per-row matrices are gathered once
        per assignment of adapters to rows (kept for the last two)."""
        stack = _remember(self._row_stacks, route.rows, lambda: self._build_row_stack(route))
        if stack is None:
            return out
        a, parts = stack
        hidden = torch.bmm(x.float()[:, None, :], a)  # (rows, 1, sum of member ranks)
        for start_out, end_out, b, start, end in parts:
            out[:, start_out:end_out] += torch.bmm(hidden[:, :, start:end], b)[:, 0].to(out.dtype)
        return out

    def _build_row_stack(self, route: _Route):
        """(A per row (rows, d_in, R), [(first output, end output, B per row (rows, r_j, d_out_j), first column,
        end column)]) in float32, zeros for rows without the member's adapter; None when no member has one."""
        a_parts, b_parts = [], []
        column = 0
        for j, member in enumerate(self.members):
            present = [n for n in route.names if isinstance(member, LoraLayer) and n in member.r]
            if not present:
                continue
            rank = max(member.r[n] for n in present)
            weight_a = member.lora_A[present[0]].weight
            a = torch.zeros(len(route.rows), weight_a.shape[1], rank, device=weight_a.device)
            b = torch.zeros(len(route.rows), rank, self.sizes[j], device=weight_a.device)
            for i, name in enumerate(route.rows):
                if name in present:
                    r = member.r[name]
                    a[i, :, :r] = member.lora_A[name].weight.detach().T
                    b[i, :r] = (member.lora_B[name].weight * member.scaling[name]).detach().T
            a_parts.append(a)
            b_parts.append((self.starts[j], self.starts[j] + self.sizes[j], b, column, column + rank))
            column += rank
        if not a_parts:
            return None
        return torch.cat(a_parts, dim=2), b_parts

    def _stack(self, route: _Route, x: torch.Tensor) -> _Stack | None:
        entry = _remember(self._stacks, (route.key, route.adapter_dtype), lambda: self._build_stack(route))
        if entry is None:
            return None
        # the routed layers' rule: float32 adapters stay float32 for small products on a CPU
        small = x.shape[0] * entry[0].rank <= SMALL_ROUTED_PRODUCT
        return entry[0] if small or entry[1] is None else entry[1]

    def _build_stack(self, route: _Route) -> tuple[_Stack, _Stack | None] | None:
        a_rows, b_parts, layout, ranks = [], [], [], [0]
        column = 0
        for j, member in enumerate(self.members):
            present = [n for n in route.names if isinstance(member, LoraLayer) and n in member.r]
            if not present:
                continue
            for n in present:
                a_rows.append(member.lora_A[n].weight.detach())
                layout.append((route.names.index(n) + 1, member.r[n]))
            b = torch.cat([(member.lora_B[n].weight * member.scaling[n]).detach() for n in present], dim=1)
            b_parts.append((self.starts[j], self.starts[j] + self.sizes[j], b, column, column + b.shape[1]))
            column += b.shape[1]
            ranks.append(b.shape[1])
        if not a_rows:
            return None
        own = a_rows[0].dtype

        def stack(dtype: torch.dtype) -> _Stack:
            b = [(lo, hi, part.to(dtype).contiguous(), start, end) for lo, hi, part, start, end in b_parts]
            return _Stack(torch.cat(a_rows).to(dtype).contiguous(), tuple(layout), b, max(ranks))

        wanted = route.adapter_dtype or own
        if wanted == own:
            return stack(own), None
        if a_rows[0].device.type == "cpu" and own == torch.float32:
            return stack(own), stack(wanted)  # small products in float32, larger ones in autocast's dtype
        return stack(wanted), None


def _fuse(bases: list[nn.Module], attr: str) -> torch.Tensor:
    """``attr`` of every base concatenated along the output dimension; each base's own then becomes a view of its
    rows (one copy in memory). A missing bias counts as zeros. A later build over the same bases whose tensors
    are still those views gets the same tensor back (no copy)."""
    key = f"_lorakit_fused_{attr}"
    records = [base.__dict__.get(key) for base in bases]
    if all(r is not None and r[0] is records[0][0] for r in records) and all(
        getattr(base, attr) is not None and getattr(base, attr).data_ptr() == r[1]
        for base, r in zip(bases, records, strict=True)
    ):
        return records[0][0]
    parts = []
    for base in bases:
        t = getattr(base, attr)
        parts.append(t.detach() if t is not None else torch.zeros(base.out_features, dtype=bases[0].weight.dtype))
    if len(parts) == 1:
        return parts[0]
    fused = torch.cat(parts).contiguous()
    start = 0
    for base, part in zip(bases, parts, strict=True):
        view = fused[start : start + part.shape[0]]
        start += part.shape[0]
        if attr == "scale":
            base.scale = view
        elif getattr(base, attr) is not None:
            setattr(base, attr, nn.Parameter(view, requires_grad=False))
        base.__dict__[key] = (fused, view.data_ptr())
    return fused


class _Route(Routing):
    """The rows' adapters for one step: ``lorakit.route``'s ``Routing`` (adapter numbers per row, 0 the base; its
    0/1 column masks, built once per layout) with the adapters' compute dtype and the choice of per-row products."""

    def __init__(self, per_row: list[str | None], adapter_dtype: torch.dtype | None, device: torch.device) -> None:
        names = sorted({n for n in per_row if n is not None})
        super().__init__(names, torch.tensor([0 if n is None else names.index(n) + 1 for n in per_row], device=device))
        self.adapter_dtype = adapter_dtype
        self.rows = tuple(per_row)
        # many different adapters among few rows: each row's own A and B in batched products (``_Group._per_row``)
        self.per_row = len(names) >= 2 and 2 * len(names) >= len(per_row) and len(per_row) <= PER_ROW_MAX


def _remember(cache: dict, key, build):
    """``cache[key]``, built by ``build()`` if missing; the cache keeps the last two keys (a server's sets of
    adapters, and their assignment to rows, keep changing)."""
    if key not in cache:
        if len(cache) >= 2:
            cache.pop(next(iter(cache)))
        cache[key] = build()
    return cache[key]


class _Layer:
    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Group([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Group([attn.o_proj])
        self.gate_up = _Group([mlp.gate_proj, mlp.up_proj])
        self.down = _Group([mlp.down_proj])
        self.norm1, self.eps1 = layer.input_layernorm.weight, _eps(layer.input_layernorm)
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling

    def groups(self) -> list[_Group]:
        return [self.qkv, self.o, self.gate_up, self.down]


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm``: float32 statistics, the normalised x back in x's dtype times the weight."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeStep:
    """One decode step of a LLaMA-family causal LM over ``SlotKV`` (see the module docstring). Build it with
    ``DecodeStep.build``; call it with each row's last token, position and adapter."""

    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        config = model.config
        self.model = model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.norm, self.norm_eps = inner.norm.weight, _eps(inner.norm)
        self.head = _Group([model.lm_head])
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.qk_width = (self.heads + self.kv_heads) * self.layers[0].head_dim
        window = getattr(config, "sliding_window", None)
        sliding = window is not None and (
            config.model_type == "mistral" or getattr(config, "use_sliding_window", False)
        )
        self.window = int(window) if sliding else None

    @classmethod
    def build(cls, model: nn.Module, wanted: bool | None = None) -> tuple[DecodeStep | None, str]:
        """The step for ``model`` and a line naming it, or None and the line that says why the model's forward
        decodes instead. ``wanted``: None (the engine's default) builds it on a CPU only, True on any device,
        False never."""
        device = next(model.parameters()).device
        if wanted is False:
            return None, "the model's forward (the engine's own step is off: fast_step=False)"
        if wanted is None and device.type != "cpu":
            return None, f"the model's forward (the engine's own step runs by default on CPUs only, not {device})"
        reason = _unsupported(model)
        if reason is not None:
            return None, f"the model's forward (the engine's own step does not cover {reason})"
        return cls(model), f"lorakit's decode step for {model.config.model_type} (fused q/k/v and gate/up products)"

    def groups(self) -> list[_Group]:
        return [g for layer in self.layers for g in layer.groups()] + [self.head]

    @torch.inference_mode()
    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, kv: SlotKV, adapters: list[str | None],
        adapter_dtype: torch.dtype | None,
    ) -> torch.Tensor | None:  # fmt: skip
        """Logits (rows, vocab) in float32 for ``ids`` (rows,) at ``positions`` (rows,), the new keys and values
        written into ``kv``'s step column (``kv.prepare_step`` first; the caller advances it); None when this step
        does not apply (a cache longer than the sliding window)."""
        if self.window is not None and kv.length + 1 > self.window:
            return None
        rows = ids.shape[0]
        route = _Route(adapters, adapter_dtype, ids.device)
        h = self.embed(ids)  # (rows, hidden)
        cos, sin = self.rotary(h, positions[:, None])  # (rows, 1, head_dim)
        cos, sin = cos[:, None].to(h.dtype), sin[:, None].to(h.dtype)  # (rows, 1, 1, head_dim)
        keep = kv.attention_mask(extra=1).bool()[:, None, None, :]  # (rows, 1, 1, columns)
        # one row: sdpa's kernel; several: two products and a float32 softmax, 3x faster on a CPU for 8 rows
        bias = None if rows == 1 else torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
        lo, hi = kv.lo, kv.hi
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.norm1, layer.eps1)
            qkv = layer.qkv(x, route).to(h.dtype)
            qk = qkv[:, : self.qk_width].view(rows, -1, 1, layer.head_dim)  # q's heads, then k's
            qk = qk * cos + _rotate_half(qk) * sin  # both rotated at once
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            keys, values = kv.keys[i], kv.values[i]
            keys[:rows, :, hi : hi + 1] = k
            values[:rows, :, hi : hi + 1] = qkv[:, self.qk_width :].view(rows, -1, 1, layer.head_dim)
            attn = self._attend(q, keys[:rows, :, lo : hi + 1], values[:rows, :, lo : hi + 1], keep, bias, layer)
            h = h + layer.o(attn.reshape(rows, -1), route).to(h.dtype)
            x = _rms_norm(h, layer.norm2, layer.eps2)
            gate, up = layer.gate_up(x, route).split(layer.gate_up.sizes, dim=-1)
            h = h + layer.down(F.silu(gate) * up, route).to(h.dtype)
        h = _rms_norm(h, self.norm, self.norm_eps)
        return self.head(h, route).float()

    def _attend(self, q, keys, values, keep, bias, layer) -> torch.Tensor:
        """Attention of the step's one query per row (rows, heads, 1, head_dim) over ``keys`` and ``values``
        (rows, kv heads, columns, head_dim); grouped heads without repeating keys and values."""
        if bias is None:
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=keep, scale=layer.scaling, enable_gqa=self.heads != self.kv_heads
            )
        rows, groups = q.shape[0], self.heads // self.kv_heads
        grouped = q.view(rows, self.kv_heads, groups, q.shape[-1])  # head h reads kv head h // groups
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(layer.scaling).add_(bias)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).view(rows, self.heads, 1, q.shape[-1])


def _unsupported(model: nn.Module) -> str | None:
    """Why ``DecodeStep`` cannot run ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model type {kind!r} (the step covers {', '.join(ARCHITECTURES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the step's MLP is SiLU-gated)"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(model, "lm_head"):
        return "a module layout other than transformers' (model.embed_tokens, layers, norm, rotary_emb; lm_head)"
    linears: set[int] = {id(model.lm_head)}
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears.update(id(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.down_proj))
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            linears.update(id(m) for m in group)
            kinds = {(type(b), b.weight.dtype, b.weight.device) for b in map(_base, group)}
            if len(kinds) > 1:  # a group's weights are concatenated: one kind, dtype and device per group
                return "q/k/v or gate/up weights of different kinds, dtypes or devices in one layer"
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            return f"modules_to_save copies ({name})"
        if isinstance(module, LoraLayer):
            if id(module) not in linears or type(module) is not LoraLinear:
                return f"an adapter on {name} (the step routes adapters on the attention, MLP and head linears)"
            if module.merged_adapters or module.disabled:
                return f"merged or disabled adapters ({name})"
            variants = [n for n in module.r if module.output_variant(n) is not None]
            if variants:
                return f"DoRA adapters ({', '.join(variants)})"
        if id(module) in linears and type(_base(module)) not in (nn.Linear, Int8Linear):
            return f"{name}'s base layer is {type(_base(module)).__name__} (the step multiplies nn.Linear and int8 weights)"
    return None


def _base(module: nn.Module) -> nn.Module:
    """The frozen linear layer under a LoRA wrapper (the layer itself when it has none)."""
    return module.base_layer if isinstance(module, LoraLayer) else module
