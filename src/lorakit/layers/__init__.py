"""LoRA wrappers around a frozen base layer, one concept per module.

           x ──────────────► base_layer (W, frozen) ──┐
           │                                          (+) ──► h = W x + scaling · B (A x)
           └─► dropout ─► A (r × d_in) ─► B (d_out × r) ┘

Each wrapper keeps its adapters by name in ``ModuleDict``s (``lora_A``, ``lora_B``: PEFT's names, so
state-dict keys read ``<path>.lora_A.<adapter>.weight``). Several adapters may be active at once (their
updates add), merged into the base weight, disabled, or routed per batch row.

- ``base``: ``LoraLayer``, bookkeeping, merge and the reference forward shared by every layer type; the
  adapter dtype policy (``adapter_dtype_for``: float32 over a bf16 / fp16 base by default)
- ``linear``: ``LoraLinear`` / ``LoraConv1D``, the reference forward plus one fast path
- ``embedding``, ``conv``: ``LoraEmbedding``, ``LoraConv2d``
- ``saved``: ``ModulesToSave``, whole trainable module copies per adapter
- ``variants``: DoRA and PiSSA as objects with their own init, forward, merge and unmerge
- ``kernels``: the autograd functions of the fast paths
- ``shared``: shared-input groups (q/k/v, gate/up read one input)
- ``routing``: per-row adapter choice of a mixed batch
- ``fused``: the optional fused MLP / RMS norm training forwards (``lorakit.fuse_forwards``)
- ``dispatch``: which wrapper takes which layer type
"""

from .base import AdapterDtype, BaseWrapper, LoraLayer, adapter_dtype_for, check_adapter_dtype
from .conv import LoraConv2d
from .dispatch import is_linear_like, wrapper_classes
from .embedding import LoraEmbedding
from .fused import fuse_forwards, unfuse_forwards
from .linear import LoraConv1D, LoraLinear
from .routing import Routing
from .saved import ModulesToSave
from .shared import SharedInput, link_shared_inputs
from .variants import DoraVariant, LoraVariant, PissaVariant

__all__ = [
    "AdapterDtype",
    "BaseWrapper",
    "DoraVariant",
    "LoraConv1D",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraVariant",
    "ModulesToSave",
    "PissaVariant",
    "Routing",
    "SharedInput",
    "adapter_dtype_for",
    "check_adapter_dtype",
    "fuse_forwards",
    "is_linear_like",
    "link_shared_inputs",
    "unfuse_forwards",
    "wrapper_classes",
]
