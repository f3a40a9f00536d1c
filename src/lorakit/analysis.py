"""What an adapter changes, layer by layer: size, rank use and direction of each update ``ΔW = s B A``.

Works from the adapter file alone (no base model needed). All figures come from small r x r matrices:
with ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR), ``ΔW = s Q_B (R_B R_A^T) Q_A^T``, so ΔW's singular values
are those of ``s R_B R_A^T``, and the inner product of two updates is ``trace((B_1^T B_2)(A_2 A_1^T))``. No
d_out x d_in matrix is formed.

Per layer: rank r, scaling s, ``||ΔW||_F``; the effective rank ``exp(H(p))`` with ``p_i = σ_i / Σσ``
(Roy & Vetterli, 2007: 1 when one direction carries everything, r when all are equal); the share of the
energy ``Σσ²`` in the top 1 and top k singular values; with a base model, ``||ΔW||_F / ||W||_F``; with a
second adapter, the cosine similarity ``<ΔW_1, ΔW_2>_F / (||ΔW_1|| ||ΔW_2||)``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .io import PREFIX, read_adapter

_FACTOR_KEYS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str) -> tuple:
    """Sort key that orders the numeric parts of a module path as numbers: layers 2 before 10, not after."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _DIGITS.split(path) if part)


@dataclass
class LayerStats:
    path: str
    rank: int
    scaling: float
    norm: float
    effective_rank: float
    energy_top1: float
    energy_topk: float
    relative_norm: float | None = None  # ||ΔW|| / ||W||, when the base model is given
    cosine: float | None = None  # with the compared adapter's update of the same layer

    @property
    def layer_index(self) -> int | None:
        found = _LAYER_INDEX.findall("." + self.path + ".")
        return int(found[-1]) if found else None

    @property
    def module_type(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass
class Inspection:
    directory: str
    top_k: int
    layers: list[LayerStats]
    compared: str | None = None
    only_here: list[str] | None = None  # layers without a counterpart in the compared adapter
    only_there: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def adapter_factors(directory: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], object]:
    """``{module path: (A, B)}`` in float32, A flattened to (r, fan_in), B to (d_out, r); and the config."""
    config, tensors = read_adapter(directory)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, which in _FACTOR_KEYS.items():
            if key.endswith(suffix):
                path = key[: -len(suffix)].removeprefix(PREFIX)
                parts.setdefault(path, {})[which] = tensor.float()
    factors = {}
    for path, ab in sorted(parts.items(), key=lambda item: natural_key(item[0])):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{directory}: layer {path} has lora_{next(iter(ab))} but not its partner; re-save it")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{directory}: layer {path} has A {tuple(a.shape)} and B {tuple(b.shape)}: ranks differ")
        factors[path] = (a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    if not factors:
        raise ValueError(f"{directory} holds no LoRA factors (lora_A / lora_B tensors); is it a LoRA adapter?")
    return factors, config


def _core(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The r x r matrix whose singular values are those of ``scaling * B @ A``."""
    r_b = torch.linalg.qr(b.double(), mode="r").R
    r_a = torch.linalg.qr(a.double().T, mode="r").R
    return scaling * r_b @ r_a.T


def layer_stats(path: str, a: torch.Tensor, b: torch.Tensor, scaling: float, top_k: int) -> LayerStats:
    sigma = torch.linalg.svdvals(_core(a, b, scaling))
    energy = sigma.square()
    total = float(energy.sum())
    if total == 0:
        return LayerStats(path, a.shape[0], scaling, 0.0, 0.0, 0.0, 0.0)
    p = sigma / sigma.sum()
    p = p[p > 0]
    effective = math.exp(float(-(p * p.log()).sum()))
    return LayerStats(
        path=path,
        rank=a.shape[0],
        scaling=scaling,
        norm=math.sqrt(total),
        effective_rank=effective,
        energy_top1=float(energy[0]) / total,
        energy_topk=float(energy[:top_k].sum()) / total,
    )


def update_inner(a1, b1, s1, a2, b2, s2) -> float:
    """``<s1 B1 A1, s2 B2 A2>_F`` from r x r products."""
    return float(s1 * s2 * torch.trace((b1.double().T @ b2.double()) @ (a2.double() @ a1.double().T)))


def inspect_adapter(
    directory: str | os.PathLike,
    compare: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    top_k: int = 4,
) -> Inspection:
    """Per-layer statistics of an adapter (see the module docstring), optionally against a second adapter
    and the base model's weights.

    Raises:
        ValueError: a directory is not a readable adapter; ``top_k`` < 1; the model lacks an adapted layer.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} is invalid: give an integer >= 1")
    factors, config = adapter_factors(directory)
    layers = []
    for path, (a, b) in factors.items():
        r, alpha = config.rank_and_alpha(path)
        if r != a.shape[0]:  # the file is the authority on the rank; alpha still follows the config
            r = a.shape[0]
        layers.append(layer_stats(path, a, b, config.scaling(r, alpha), top_k))
    result = Inspection(directory=str(directory), top_k=top_k, layers=layers)
    if model is not None:
        for stats in layers:
            weight = _base_weight(model, stats.path)
            stats.relative_norm = stats.norm / max(float(weight.float().norm()), 1e-30)
    if compare is not None:
        other, other_config = adapter_factors(compare)
        result.compared = str(compare)
        result.only_here = sorted(set(factors) - set(other), key=natural_key)
        result.only_there = sorted(set(other) - set(factors), key=natural_key)
        for stats in layers:
            if stats.path not in other:
                continue
            a2, b2 = other[stats.path]
            _r2, alpha2 = other_config.rank_and_alpha(stats.path)
            s2 = other_config.scaling(a2.shape[0], alpha2)
            a1, b1 = factors[stats.path]
            norm2 = math.sqrt(max(update_inner(a2, b2, s2, a2, b2, s2), 0.0))
            denominator = stats.norm * norm2
            inner = update_inner(a1, b1, stats.scaling, a2, b2, s2)
            stats.cosine = inner / denominator if denominator > 0 else 0.0
    return result


def _base_weight(model: nn.Module, path: str) -> torch.Tensor:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"the model has no module {path}, which the adapter adapts; is it the right base model?"
        ) from None
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {path} of the model has no weight tensor")
    return weight.detach()


def format_table(result: Inspection) -> str:
    """A plain-text table, one row per layer, then a summary line."""
    k = result.top_k
    head = ["layer", "rank", "scaling", "||dW||", "eff.rank", "top1", f"top{k}"]
    with_rel = any(s.relative_norm is not None for s in result.layers)
    with_cos = result.compared is not None
    if with_rel:
        head.append("||dW||/||W||")
    if with_cos:
        head.append("cosine")
    rows = []
    for s in result.layers:
        row = [s.path, str(s.rank), f"{s.scaling:g}", f"{s.norm:.4g}", f"{s.effective_rank:.2f}"]
        row += [f"{s.energy_top1:.1%}", f"{s.energy_topk:.1%}"]
        if with_rel:
            row.append(f"{s.relative_norm:.3g}" if s.relative_norm is not None else "")
        if with_cos:
            row.append(f"{s.cosine:+.3f}" if s.cosine is not None else "-")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
    lines += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    norms = [s.norm for s in result.layers]
    total = math.sqrt(sum(n * n for n in norms))
    summary = f"{len(rows)} layers; total ||dW|| {total:.4g}; mean effective rank "
    summary += f"{sum(s.effective_rank for s in result.layers) / len(rows):.2f}"
    if with_cos:
        cos = [s.cosine for s in result.layers if s.cosine is not None]
        if cos:
            summary += f"; mean cosine with {result.compared}: {sum(cos) / len(cos):+.3f} over {len(cos)} shared layers"
        if result.only_here or result.only_there:
            summary += f"; {len(result.only_here or [])} layers only here, {len(result.only_there or [])} only there"
    return "\n".join([*lines, summary])


def heat_map(result: Inspection, path: str | os.PathLike) -> Path:
    """PNG: ``||ΔW||`` (and the cosine with the compared adapter) over layer index x module type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({s.module_type for s in result.layers})
    indices = sorted({s.layer_index for s in result.layers if s.layer_index is not None})
    rows = [*indices, None] if any(s.layer_index is None for s in result.layers) else indices
    panels = [("||ΔW||_F", "norm", "viridis", None)]
    if result.compared is not None:
        panels.append((f"cosine with {Path(result.compared).name}", "cosine", "coolwarm", (-1.0, 1.0)))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.2 + 0.9 * len(types) * len(panels), 1.5 + 0.28 * len(rows)), squeeze=False
    )
    for ax, (title, attr, cmap, limits) in zip(axes[0], panels, strict=True):
        grid = torch.full((len(rows), len(types)), float("nan"))
        for s in result.layers:
            value = getattr(s, attr)
            if value is not None:
                grid[rows.index(s.layer_index), types.index(s.module_type)] = value
        vmin, vmax = limits or (None, None)
        image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), [str(i) if i is not None else "other" for i in rows])
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(Path(result.directory).name or str(result.directory))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
