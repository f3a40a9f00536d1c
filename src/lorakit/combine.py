"""Build a new adapter from existing ones: linear, cat, svd, ties, dare_linear (and the *_svd variants).

Every method works layer by layer on the adapters' factors ``A`` (r x d_in) and ``B`` (d_out x r), with
``scaling`` s, whose update is ``s B A``. The new adapter has scaling 1 (alpha = r) and is added beside the
others, not activated. Same definitions as PEFT's ``add_weighted_adapter`` (tested against it):

- ``cat``: ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]``, ``B = [B_1, ..., B_n]``. Exact: the update is
  ``sum_i w_i s_i B_i A_i``; its rank is the sum of the ranks. Adapters may target different layers.
- ``svd``: the exact weighted sum of the updates, truncated by SVD to ``rank`` (default: the largest rank
  among the inputs), ``B = U_k S_k``, ``A = V_k^T``. The relative error of the truncation is reported.
- ``linear``: ``A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i``. Cheap, keeps the
  rank, but not the weighted sum of the updates (cross terms ``B_i A_j`` appear); needs equal ranks.
- ``ties``: like ``linear`` on A and B, each input first pruned to its ``density`` largest-magnitude entries,
  then a sign elected per entry and only the agreeing entries averaged (TIES-merging).
- ``dare_linear``: like ``linear``, each input first pruned at random to ``density`` and rescaled by 1/density
  (DARE). Random: pass ``seed`` to make it repeatable.
- ``ties_svd``, ``dare_linear_svd``: TIES or DARE applied to the full updates ``s_i B_i A_i``, then the SVD
  truncation.

Adapters with ``modules_to_save`` are refused (a whole trained module cannot be combined entry-wise), and so
are DoRA and (unconverted) PiSSA adapters, whose updates are not a plain ``s B A`` on the original weights.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import LoraConfig
from .inject import add_adapter_layers, check_new_name, update_trainable
from .layers import AdapterDtype, LoraConv2d, LoraEmbedding, LoraLayer, check_adapter_dtype
from .state import check_adapter_name, registry

FACTOR_METHODS = ("linear", "ties", "dare_linear")  # entry-wise on A and B: equal targets and ranks needed
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd")
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
SIGN_METHODS = ("total", "frequency")


@dataclass
class CombineReport:
    """What ``combine`` built: the method, the rank of each layer and, for the SVD methods, the relative
    Frobenius error ``||M - M_k|| / ||M||`` of each layer's truncation."""

    method: str
    ranks: dict[str, int] = field(default_factory=dict)
    truncation_error: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        text = f"{self.method}: {len(self.ranks)} layers, rank {rank_text}"
        if self.truncation_error:
            worst = max(self.truncation_error.values())
            mean = sum(self.truncation_error.values()) / len(self.truncation_error)
            text += f", SVD truncation error (relative Frobenius) mean {mean:.2e}, worst {worst:.2e}"
        return text


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    method: str = "cat",
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int | None = None,
    adapter_dtype: AdapterDtype = None,
) -> CombineReport:
    """Add adapter ``name`` made from the adapters in ``weights`` (``{adapter: weight}``; negative weights
    subtract). The new adapter is frozen and not activated: ``set_active(model, name)`` to use it.

    Args:
        method: one of ``METHODS`` (see the module docstring for the definitions).
        rank: target rank of the SVD methods (default: the largest input rank).
        density: the share of entries kept (0 < density <= 1); required by ties and dare methods.
        majority_sign: how TIES elects the sign: ``total`` (sign of the summed values) or ``frequency``.
        seed: random seed for DARE; without it the global torch generator is used (as PEFT does).
        adapter_dtype: the new adapter's dtype, as for ``inject`` (default: float32 over a bf16 / fp16 base);
            the factors are computed in float32 whatever the inputs' dtypes.

    Raises:
        ValueError: unknown adapter or method, bad weights/rank/density, the name is in use, adapters with
            modules_to_save, or (for linear, ties, dare_linear) adapters whose targets or ranks differ.
    """
    check_new_name(model, name)
    check_adapter_dtype(adapter_dtype)
    weights = _check_weights(model, weights)
    _check_options(method, rank, density, majority_sign)
    reg = registry(model)
    with_saved = [a for a in weights if reg.adapters[a].saved_modules]
    if with_saved:
        raise ValueError(
            f"adapters {with_saved} train whole modules (modules_to_save); combine works on LoRA layers only. "
            "Combine adapters trained without modules_to_save"
        )
    layers = _layers_of(model, list(weights))
    variants = sorted({a for a in weights for m in layers.values() if a in m.r and m.variants.get(a)})
    if variants:
        raise ValueError(
            f"adapters {variants} use DoRA or PiSSA, whose updates are not a plain s B A on the original weights; "
            "combine plain LoRA adapters (a PiSSA adapter becomes one when saved and loaded again)"
        )
    if method in FACTOR_METHODS:
        _check_same_layers_and_ranks(layers, list(weights), method)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report = CombineReport(method=method)
    for path, layer in layers.items():
        present = [(a, w) for a, w in weights.items() if a in layer.r]
        if method == "cat":
            a_new, b_new = _cat(layer, present)
        elif method in FACTOR_METHODS:
            a_new, b_new = _entrywise(layer, present, method, density, majority_sign, generator)
        else:
            a_new, b_new, error = _svd(layer, present, method, rank, density, majority_sign, generator)
            report.truncation_error[path] = error
        factors[path] = (a_new, b_new)
        report.ranks[path] = a_new.shape[0]

    base = Counter(report.ranks.values()).most_common(1)[0][0]
    escaped = {re.escape(p): r for p, r in report.ranks.items() if r != base}
    config = LoraConfig(
        r=base,
        alpha=float(base),
        target_modules=list(layers),
        rank_pattern=escaped,
        alpha_pattern={k: float(v) for k, v in escaped.items()},
    )
    add_adapter_layers(model, config, name, list(layers), [], adapter_dtype=adapter_dtype)
    reg.adapters[name].trainable = False
    with torch.no_grad():
        for path, (a_new, b_new) in factors.items():
            _set_factors(layers[path], name, a_new, b_new)
    update_trainable(model)
    return report


# ----- checks ---------------------------------------------------------------------------------------------
def _check_weights(model: nn.Module, weights: Mapping[str, float]) -> dict[str, float]:
    if isinstance(weights, str) or not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"weights must be a non-empty dict {{adapter name: weight}}, got {weights!r}")
    checked: dict[str, float] = {}
    for adapter, weight in weights.items():
        check_adapter_name(model, adapter)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"weight of adapter {adapter!r} must be a finite number, got {weight!r}")
        checked[adapter] = float(weight)
    return checked


def _check_options(method: str, rank: int | None, density: float | None, majority_sign: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {', '.join(METHODS)}")
    if rank is not None:
        if method not in SVD_METHODS:
            raise ValueError(f"rank is only used by the SVD methods ({', '.join(SVD_METHODS)}), not {method!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} is invalid: give an integer >= 1")
    needs_density = method.startswith(("ties", "dare"))
    if needs_density:
        if density is None:
            raise ValueError(f"method {method!r} needs density, the share of entries kept (0 < density <= 1)")
        if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
            raise ValueError(f"density={density!r} is invalid: it must satisfy 0 < density <= 1")
    elif density is not None:
        raise ValueError(f"density is only used by ties and dare methods, not {method!r}")
    if majority_sign not in SIGN_METHODS:
        raise ValueError(f"majority_sign={majority_sign!r} is invalid; use one of {SIGN_METHODS}")


def _layers_of(model: nn.Module, adapters: list[str]) -> dict[str, LoraLayer]:
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, LoraLayer) and any(a in module.r for a in adapters)
    }


def _check_same_layers_and_ranks(layers: dict[str, LoraLayer], adapters: list[str], method: str) -> None:
    for path, layer in layers.items():
        missing = [a for a in adapters if a not in layer.r]
        if missing:
            raise ValueError(
                f"method {method!r} combines A and B entry-wise, so every adapter must target the same layers, "
                f"but {path} has no {missing}; use method 'cat' or 'svd' for adapters with different targets"
            )
        ranks = {a: layer.r[a] for a in adapters}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"method {method!r} needs equal ranks, but {path} has ranks {ranks}; "
                "use method 'cat' or 'svd' for adapters of different ranks"
            )


# ----- factors --------------------------------------------------------------------------------------------
def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in PEFT's layout, detached float32: A (r, ...), B (d_out, r, ...)."""
    if isinstance(layer, LoraEmbedding):
        a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    else:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return a.detach().float(), b.detach().float()


def _set_factors(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if isinstance(layer, LoraEmbedding):
        a_param, b_param = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        a_param, b_param = layer.lora_A[name].weight, layer.lora_B[name].weight
    a_param.copy_(a.reshape(a_param.shape))
    b_param.copy_(b.reshape(b_param.shape))


def _cat(layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    a_parts, b_parts = [], []
    for adapter, weight in present:
        a, b = _factors(layer, adapter)
        a_parts.append(a * (weight * layer.scaling[adapter]))
        b_parts.append(b)
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def _entrywise(layer, present, method, density, majority_sign, generator) -> tuple[torch.Tensor, torch.Tensor]:
    a_list, b_list, w_a, w_b = [], [], [], []
    for adapter, weight in present:
        a, b = _factors(layer, adapter)
        scaled = weight * layer.scaling[adapter]
        root = math.sqrt(abs(scaled))
        w_a.append(root if scaled >= 0 else -root)  # the sign goes on one side only
        w_b.append(root)
        a_list.append(a)
        b_list.append(b)
    kind = method.removesuffix("_linear")
    merged_a = _merge(a_list, torch.tensor(w_a), kind, density, majority_sign, generator)
    merged_b = _merge(b_list, torch.tensor(w_b), kind, density, majority_sign, generator)
    return merged_a, merged_b


def _svd(layer, present, method, rank, density, majority_sign, generator):
    deltas, layout_a, layout_b = [], None, None
    for adapter, _ in present:
        a, b = _factors(layer, adapter)
        layout_a, layout_b = a.shape[1:], b.shape[0]
        deltas.append((b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * layer.scaling[adapter])
    weights = torch.tensor([w for _, w in present])
    kind = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare"}[method]
    delta = _merge(deltas, weights, kind, density, majority_sign, generator)
    k = rank or max(layer.r[a] for a, _ in present)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(k, s.numel())
    total = s.square().sum()
    error = math.sqrt(float(s[k:].square().sum() / total)) if total > 0 else 0.0
    b_new = u[:, :k] * s[:k]
    a_new = vh[:k]
    if isinstance(layer, LoraConv2d):
        return a_new.reshape(k, *layout_a), b_new.reshape(layout_b, k, 1, 1), error
    return a_new, b_new, error


# ----- the merging operators (PEFT's definitions, torch.stack over the inputs) -------------------------------
def _merge(tensors, weights, kind, density, majority_sign, generator) -> torch.Tensor:
    if kind == "ties":
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif kind == "dare":
        tensors = [_random_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if kind != "ties":
        return weighted.sum(0)
    signs = stacked.sign()
    votes = stacked.sum(0) if majority_sign == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[tensor.abs().reshape(-1).topk(k).indices] = 1
    return tensor * mask.view(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def parse_weights(adapters: Sequence[str], weights: str | None) -> list[float]:
    """``--weights 0.7,0.3`` for the CLI: one number per adapter (default 1.0 each)."""
    if weights is None:
        return [1.0] * len(adapters)
    try:
        values = [float(v) for v in weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights {weights!r} is invalid: give comma-separated numbers, e.g. 0.7,0.3") from None
    if len(values) != len(adapters):
        raise ValueError(f"--weights has {len(values)} numbers for {len(adapters)} adapters; give one per adapter")
    return values
