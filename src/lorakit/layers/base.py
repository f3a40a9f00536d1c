"""The base LoRA wrapper: adapters by name, merge and unmerge, and the reference forward every layer type shares.

A subclass says how its adapter tensors look (``_create``, ``_initialise``, ``adapter_state``), what one
adapter's update is (``_update``, ``delta_weight``) and how a routed batch computes it (``_routed_update``).
Variants (DoRA, PiSSA: ``lorakit.layers.variants``) change init, forward or merge of one adapter and apply
to layers with ``supports_variants``.

Adapter dtype (``adapter_dtype_for``): by default float32 over a bfloat16 or float16 base (PEFT's
``autocast_adapter_dtype=True``: an update of lr 2e-4 on entries of ~0.03 is below one bf16 step), else the
base's dtype. The reference forward then computes each update in the adapter's dtype and casts it to the
base output's (``LoraLayer.adapter_input``); under ``torch.autocast`` the products run in autocast's dtype instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .._bnb import float_dtype, is_quantized, quant_method
from ..precision import AUTOCAST_CASTS, LOW_PRECISION, autocast_dtype, cast
from .routing import Routing
from .variants import LoraVariant, variants_for

AdapterDtype = torch.dtype | str | None
"""``None`` (float32 over a bfloat16 / float16 base, else the base's dtype), ``"base"`` or a float dtype."""


class BaseWrapper(nn.Module):
    """Shared by LoRA layers and modules_to_save wrappers: attribute passthrough to the wrapped module."""

    wrapped_attr = "base_layer"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped_attr:
                raise
            return getattr(getattr(self, self.wrapped_attr), name)


class LoraLayer(BaseWrapper):
    """Common logic of all LoRA wrappers; subclasses define the adapter tensors and their maths."""

    supports_variants = False  # DoRA and PiSSA: linear layers only

    @staticmethod
    def unsupported_reason(base_layer: nn.Module) -> str | None:
        """Why this wrapper cannot take ``base_layer`` although its type matches (None: it can)."""
        return None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, list[LoraVariant]] = {}
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

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        init: str,
        use_dora: bool = False,
        *,
        adapter_dtype: AdapterDtype = None,
    ) -> None:
        """Add adapter ``name``: its tensors (A, B, a DoRA magnitude, PiSSA's initial factors) in the dtype
        ``adapter_dtype_for`` gives for this base layer, on the base weight's device."""
        assert name not in self.r, f"adapter {name!r} already on this layer"
        variants = variants_for(init, use_dora)
        if variants and not self.supports_variants:
            raise ValueError(f"DoRA and PiSSA apply to linear layers only, not {type(self.base_layer).__name__}")
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = scaling
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create(name, r)
        self._initialise(name, init)
        weight = self.base_layer.weight
        dtype = adapter_dtype_for(float_dtype(self.base_layer), adapter_dtype)
        for param in self.adapter_parameters(name):  # before the variants: they follow A's dtype
            # on a skeleton's layer (meta weights, sharded training) the initial adapter stays on the CPU
            param.data = param.data.to(device=param.device if weight.is_meta else weight.device, dtype=dtype)
        if variants:
            self.variants[name] = variants
            for variant in variants:
                variant.init(self, name)
        self.train(self.training)  # the new dropout and A/B modules follow the layer's mode

    def remove_adapter(self, name: str) -> None:
        assert name not in self.merged_adapters, "unmerge before removing"
        self.forget_variants(name)
        for table in self._tables():
            del table[name]
        del self.lora_dropout[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            del d[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def forget_variants(self, name: str) -> None:
        """Undo what DoRA or PiSSA added for adapter ``name`` (PiSSA gives the base weight back)."""
        for variant in reversed(self.variants.pop(name, [])):
            variant.forget(self, name)

    def output_variant(self, name: str) -> LoraVariant | None:
        """The variant that changes adapter ``name``'s forward and merge (DoRA), if any."""
        return next((v for v in self.variants.get(name, []) if v.changes_output), None)

    def uses(self, name: str, variant: str) -> bool:
        """Whether adapter ``name`` has the variant called ``variant`` (``dora`` or ``pissa``)."""
        return any(v.name == variant for v in self.variants.get(name, []))

    def _tables(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        raise NotImplementedError

    def _create(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _initialise(self, name: str, init: str) -> None:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for table in self._tables():
            entry = table[name]
            params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
        for variant in self.variants.get(name, []):
            params.extend(variant.parameters(self, name))
        return params

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's relative key names (no adapter name in the key)."""
        state = self._own_state(name)
        for variant in self.variants.get(name, []):
            state.update(variant.state(self, name))
        return state

    def _own_state(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ----- merge ------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B A laid out like ``base_layer.weight``, computed in float32."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, names: Iterable[str]) -> None:
        refuse_quantized_merge(self.base_layer)
        for name in names:
            if name in self.r and name not in self.merged_adapters:
                self._fold(name, merge=True)
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, names: Iterable[str] | None = None) -> None:
        targets = list(self.merged_adapters if names is None else names)
        for name in reversed(self.merged_adapters[:]):
            if name in targets:
                self._fold(name, merge=False)
                self.merged_adapters.remove(name)

    def _fold(self, name: str, merge: bool) -> None:
        """Add adapter ``name``'s update into the base weight (``merge``) or take it out again."""
        variant = self.output_variant(name)
        if variant is not None:
            (variant.merge if merge else variant.unmerge)(self, name)
            return
        weight = self.base_layer.weight
        weight.add_(self.delta_weight(name).to(weight.dtype), alpha=1 if merge else -1)

    # ----- forward: the reference maths -------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``W x + Σ scaling · B A dropout(x)`` over the active, unmerged adapters (a variant may change its
        adapter's term); one adapter per row under ``route``; the base alone when disabled."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.routing is not None:
            return self._routed(x, result)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            variant = self.output_variant(name)
            if variant is not None:
                result = variant.forward(self, name, x, result)
            else:
                result = result + self._update(x, name).to(result.dtype)
        return result

    def _routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if not self.routing.names:  # every row on the base model
            return result
        if self.merged_adapters:
            raise RuntimeError("route() needs unmerged adapters; call lorakit.unmerge(model) first")
        return result + self._routed_update(x, self.routing).to(result.dtype)

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """scaling · B(A(dropout(x))) for one adapter."""
        raise NotImplementedError

    def _routed_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` for an adapter whose tensors are ``dtype``: cast to it outside autocast (the update is computed
        in the adapter's dtype, and the caller casts it back to the base output's); unchanged under autocast,
        whose products cast their inputs themselves (a float32 copy of a bf16 activation would be wasted), except
        float64 ones, which autocast leaves alone."""
        if x.dtype in AUTOCAST_CASTS and autocast_dtype(x.device.type) is not None:
            return x
        return cast(x, dtype)

    def _row_index(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return routing.rows_for(x.shape[0], x.device)

    def _row_dropout(self, x: torch.Tensor, names: list[str], index: torch.Tensor) -> torch.Tensor:
        """Dropout with each row's own adapter probability (training only)."""
        probs = [0.0] + [dropout_p(self.lora_dropout[n]) if n in self.r else 0.0 for n in names]
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
        parts = []
        for n in self.r:
            kinds = "".join(f", {v.name}" for v in self.variants.get(n, []))
            parts.append(f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}{kinds}")
        return "adapters=[" + "; ".join(parts) + f"], active={self.active_adapters}, merged={self.merged_adapters}"


def check_adapter_dtype(adapter_dtype: AdapterDtype) -> None:
    """Raise ValueError, naming the choices, unless ``adapter_dtype`` is None, "base" or a float torch.dtype."""
    if adapter_dtype is None or adapter_dtype == "base":
        return
    if isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point:
        return
    raise ValueError(
        f"adapter_dtype={adapter_dtype!r} is invalid: use None (float32 over a bfloat16 or float16 base, else the "
        "base's dtype), 'base' (the base layer's dtype) or a floating torch.dtype such as torch.float32"
    )


def adapter_dtype_for(base_dtype: torch.dtype, adapter_dtype: AdapterDtype) -> torch.dtype:
    """The dtype of an adapter over a base layer computing in ``base_dtype`` (see ``check_adapter_dtype``)."""
    if adapter_dtype is None:
        return torch.float32 if base_dtype in LOW_PRECISION else base_dtype
    if adapter_dtype == "base":
        return base_dtype
    return adapter_dtype


def refuse_quantized_merge(base: nn.Module) -> None:
    weight = getattr(base, "weight", None)
    if not is_quantized(base) and isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point:
        raise ValueError(
            f"cannot merge into a {weight.dtype}-valued base weight ({type(base).__name__}: int8 inference weights, "
            "lorakit.weights): it would have to be rounded again; load the model in float (--weights precision) to "
            "merge"
        )
    if is_quantized(base):
        raise ValueError(
            f"cannot merge into a {quant_method(base)}-quantized base weight: it would have to be rounded to "
            f"{quant_method(base)} again, changing the result. Dequantize first (lorakit.quant.dequantize(model)) "
            "to merge in float, or use `lorakit merge --quantize ...`, which does that and reports the drift "
            "re-quantizing would cause"
        )


def init_factors(a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
    """LoRA's initialisations of A and B (the update starts at zero unless ``random``): ``default``, Kaiming
    A and zero B; ``gaussian``, normal A (std 1/r) and zero B; ``random``, the layers' own initialisation;
    ``pissa``, nothing here (``PissaVariant.init`` sets both from W)."""
    if init == "default":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
    elif init == "gaussian":
        nn.init.normal_(a, std=1 / r)
        nn.init.zeros_(b)


def dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0
