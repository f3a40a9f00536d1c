"""LoraConfig: the validated description of one LoRA adapter."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = {
    "default": "A Kaiming-uniform, B zero: the adapted model starts equal to the base model",
    "gaussian": "A normal with std 1/r, B zero: starts equal to the base model",
    "random": "A and B both random (PyTorch's layer defaults): the adapter changes the model from the start; "
    "for tests and experiments",
    "pissa": "PiSSA: A and B from the top-r singular vectors and values of W, and W replaced by the residual "
    "W - scaling * B A, so the model starts unchanged and training moves W's principal directions; linear "
    "layers only. save_adapter converts the result to an ordinary LoRA adapter (rank 2r) for the original base",
}


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter. Every field is checked in ``__post_init__``.

    The update added beside each targeted weight W is ``scaling * B @ A`` with ``A: r x d_in``,
    ``B: d_out x r`` and ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    """

    r: int = 8
    """Rank of the update. Must be >= 1. A rank above min(d_in, d_out) of a layer only adds parameters
    (the update's rank cannot exceed that); lorakit warns when that happens and carries on."""

    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r. Must be > 0."""

    dropout: float = 0.0
    """Dropout probability on the adapter's input path (0 <= dropout < 1). Not applied to embeddings."""

    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Which modules get an adapter. A list of exact module paths or name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``); a single string is a regex matched against the full module path;
    ``"all-linear"`` means every linear layer except the output head. Every list entry must match something."""

    exclude_modules: list[str] | str | None = None
    """Modules never targeted: a list of paths/suffixes or a regex over the full path."""

    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these block indices (the number in ``...layers.<i>...``)."""

    layers_pattern: list[str] | str | None = None
    """Name of the block list that ``layers_to_transform`` indexes (``"layers"``, ``"h"``). Default: the
    first ``<name>.<index>.`` in the module path."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: ``{pattern: r}``; a pattern is a regex matched against the end of the
    module path (PEFT's rule)."""

    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, same matching as ``rank_pattern``."""

    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""

    init: str = "default"
    """Initialisation of A and B; one of ``default``, ``gaussian``, ``random``, ``pissa`` (see ``INIT_METHODS``)."""

    bias: str = "none"
    """Which biases train: ``none``; ``all`` (every bias in the model); ``lora_only`` (biases of adapted
    layers). Trained biases are saved with the adapter, as PEFT does."""

    modules_to_save: list[str] | None = None
    """Whole modules trained and saved with the adapter (for example a classification head ``classifier``),
    matched like ``target_modules`` list entries."""

    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): the adapted weight is ``m * (W + s B A) / ||W + s B A||`` per output
    feature, with a trained magnitude vector m (PEFT's definition; the norm is not differentiated). Linear
    layers only."""

    def __post_init__(self) -> None:
        self._check_numbers()
        self.target_modules = _check_targets(self.target_modules, "target_modules")
        if self.exclude_modules is not None:
            self.exclude_modules = _check_targets(self.exclude_modules, "exclude_modules")
        self.layers_to_transform = _check_layers(self.layers_to_transform)
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern is set but layers_to_transform is not: set both or neither")
        self._check_patterns()
        if self.init not in INIT_METHODS:
            raise ValueError(f"init={self.init!r} is not a known method; use one of {sorted(INIT_METHODS)}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is not valid; use one of {list(BIAS_MODES)}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    def _check_numbers(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"r must be an integer, got {self.r!r}")
        if self.r < 1:
            raise ValueError(f"r={self.r} is invalid: the rank must be >= 1 (typical values: 4 to 64)")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} is invalid: it must be a finite number > 0 (often 2 * r)")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} is invalid: it must satisfy 0 <= dropout < 1")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _check_patterns(self) -> None:
        for attr, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            pattern = getattr(self, attr)
            if pattern is None:
                setattr(self, attr, {})
                continue
            if not isinstance(pattern, dict):
                raise TypeError(f"{attr} must be a dict of {{pattern: value}}, got {type(pattern).__name__}")
            for key, value in pattern.items():
                _compile(key, f"{attr} key")
                if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ValueError(f"{attr}[{key!r}]={value!r} is invalid: ranks are integers >= 1")
                if kind is float and (not _is_number(value) or not math.isfinite(value) or value <= 0):
                    raise ValueError(f"{attr}[{key!r}]={value!r} is invalid: alphas are numbers > 0")

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The rank and alpha for one module path after ``rank_pattern`` / ``alpha_pattern``."""
        r = _lookup_pattern(self.rank_pattern, module_path, self.r)
        alpha = _lookup_pattern(self.alpha_pattern, module_path, self.alpha)
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        """The factor applied to B @ A for a layer of rank ``r``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {err}") from None


def _check_targets(value: Any, what: str) -> list[str] | str:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} is an empty string; give module names, a regex, or 'all-linear'")
        if value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        _compile(value, what)
        return value
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else list(value)
        if not items:
            raise ValueError(f"{what} is an empty list; name at least one module, or use 'all-linear'")
        bad = [item for item in items if not isinstance(item, str) or not item]
        if bad:
            raise TypeError(f"{what} entries must be non-empty strings, got {bad!r}")
        return items
    raise TypeError(f"{what} must be a list of names, a regex string or 'all-linear', got {value!r}")


def _check_layers(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise ValueError(f"layers_to_transform={value!r} is invalid: give a layer index or a list of indices >= 0")
    return list(items)


def _lookup_pattern(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    key = match_pattern_key(patterns, module_path)
    return default if key is None else patterns[key]


def match_pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    """PEFT's rule: the first pattern that matches a dotted suffix of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None
