"""Which modules a LoraConfig targets: PEFT's matching rules, output-head detection, supported types."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterator

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .layers import LoraLayer, ModulesToSave, is_linear_like, wrapper_classes

HEAD_NAMES = ("classifier", "score")  # classification heads: "all-linear" leaves them alone, training saves them
_DEFAULT_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) pairs a pattern may target: everything except the insides of lorakit wrappers."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoraLayer | ModulesToSave):
            inside.append(path)
        yield path, module


def name_matches(entry: str, path: str) -> bool:
    """A list entry matches a module path exactly or as a dotted suffix (PEFT's rule)."""
    return path == entry or path.endswith("." + entry)


def _pattern_matches(pattern: list[str] | str, path: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(name_matches(entry, path) for entry in pattern)


def find_targets(model: nn.Module, config: LoraConfig, skip: list[str] = (), strict: bool = True) -> list[str]:
    """Module paths that ``config`` targets, in model order; errors name what does not match."""
    modules = [(p, m) for p, m in candidate_modules(model) if not _inside_any(p, skip)]
    if config.target_modules == ALL_LINEAR:
        heads = output_heads(model)
        matched = [p for p, m in modules if is_linear_like(m) and p not in heads]
        if not matched:
            raise ValueError("target_modules='all-linear' found no nn.Linear or Conv1D layer in this model")
    else:
        matched = [p for p, _ in modules if _pattern_matches(config.target_modules, p)]
        if strict:
            _check_every_entry_matches(config.target_modules, [p for p, _ in modules])
    if config.exclude_modules is not None:
        matched = [p for p in matched if not _pattern_matches(config.exclude_modules, p)]
    if config.layers_to_transform is not None:
        matched = [p for p in matched if _layer_index(p, config.layers_pattern) in config.layers_to_transform]
    if not matched:
        raise ValueError(
            f"target_modules={config.target_modules!r} selects no module once exclude_modules / "
            f"layers_to_transform are applied (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r})"
        )
    by_path = dict(modules)
    _check_supported([(p, by_path[p]) for p in matched])
    _refuse_tied_to_embedding(model, [(p, by_path[p]) for p in matched])
    return matched


def find_modules_to_save(model: nn.Module, entries: list[str], strict: bool = True) -> list[str]:
    """Module paths named by ``modules_to_save`` entries (exact paths or suffixes)."""
    if not entries:
        return []
    paths = [p for p, _ in candidate_modules(model)]
    if strict:
        _check_every_entry_matches(entries, paths, what="modules_to_save")
    found = [p for p in paths if any(name_matches(e, p) for e in entries)]
    return [p for p in found if not _inside_any(p, [q for q in found if q != p])]


def _inside_any(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in parents)


def output_heads(model: nn.Module) -> set[str]:
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if out is not None and (module is out or getattr(module, "base_layer", None) is out):
            heads.add(path)
    if not heads:
        heads.update(name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module))
    return heads


def embedding_weights(model: nn.Module) -> dict[int, str]:
    """``{id(weight): path}`` of the model's embeddings, wrapped or not; a weight several embeddings share
    (T5's ``shared``) is named by its first, in model order: the input embedding."""
    found: dict[int, str] = {}
    for path, module in candidate_modules(model):
        inner = getattr(module, "base_layer", module)
        if isinstance(inner, nn.Embedding):
            found.setdefault(id(inner.weight), path)
    return found


def _refuse_tied_to_embedding(model: nn.Module, pairs: list[tuple[str, nn.Module]]) -> None:
    """A layer whose weight is an embedding's own tensor (an output head under tie_word_embeddings): LoRA on
    it would train, but no merge can change the head alone, and a GGUF file has no separate head to adapt."""
    embeddings = embedding_weights(model)
    for path, module in pairs:
        inner = getattr(module, "base_layer", module)
        weight = getattr(inner, "weight", None)
        if isinstance(inner, nn.Embedding) or weight is None or id(weight) not in embeddings:
            continue
        raise ValueError(
            f"cannot add LoRA to {path}: its weight is tied to the input embedding {embeddings[id(weight)]} "
            "(tie_word_embeddings), so an adapter on it could not be merged (the merge would change the "
            "embedding too) nor exported to GGUF (where the head is the embedding). Leave it out of "
            "target_modules ('all-linear' already does), or untie the head first (give it its own copy of the "
            "weight and set tie_word_embeddings=False)"
        )


def _layer_index(path: str, layers_pattern: list[str] | None) -> int | None:
    if not layers_pattern:
        found = _DEFAULT_LAYER_INDEX.match(path)
        return int(found.group(1)) if found else None
    for pattern in layers_pattern:
        found = re.match(rf".*\.{pattern}\.(\d+)\.", path)
        if found:
            return int(found.group(1))
    return None


def _check_every_entry_matches(pattern: list[str] | str, paths: list[str], what: str = "target_modules") -> None:
    if isinstance(pattern, str):
        if not any(re.fullmatch(pattern, p) for p in paths):
            raise ValueError(
                f"{what} regex {pattern!r} matches no module path (it must match the whole path). "
                f"Some paths in this model: {sample(paths)}"
            )
        return
    missing = [entry for entry in pattern if not any(name_matches(entry, p) for p in paths)]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths} | set(paths))
        hints = []
        for entry in missing:
            close = difflib.get_close_matches(entry, names, n=3, cutoff=0.5)
            hints.append(f"{entry!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p in paths if not p.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(
            f"{what} entr{'y' if len(missing) == 1 else 'ies'} {', '.join(hints)} matched no module. "
            f"Module names in this model: {sample(leaf_names, 40)}"
        )


def sample(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def supported_types() -> list[str]:
    return [base.__name__ for base, _ in wrapper_classes()]


def wrapper_class(module: nn.Module) -> type[LoraLayer]:
    for base_type, wrapper in wrapper_classes():
        if isinstance(module, base_type):
            return wrapper
    raise AssertionError("checked by _check_supported")


def _check_supported(pairs: list[tuple[str, nn.Module]]) -> None:
    bad = [
        (p, type(m).__name__)
        for p, m in pairs
        if not isinstance(m, LoraLayer) and not any(isinstance(m, t) for t, _ in wrapper_classes())
    ]
    if bad:
        listed = ", ".join(f"{p} ({t})" for p, t in bad[:5])
        raise ValueError(
            f"cannot add LoRA to {listed}{' ...' if len(bad) > 5 else ''}: unsupported layer type. "
            f"Supported types: {', '.join(supported_types())}. Target the linear layers inside instead "
            "(for example 'q_proj' rather than 'self_attn')."
        )
    for path, module in pairs:
        if not isinstance(module, LoraLayer):
            reason = wrapper_class(module).unsupported_reason(module)
            if reason:
                raise ValueError(f"cannot add LoRA to {path}: {reason}")


def warn_large_ranks(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    too_big = []
    for path in targets:
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer):
            module = module.base_layer
        dims = _dims(module)
        r, _ = config.rank_and_alpha(path)
        if dims and r > min(dims):
            too_big.append(f"{path} (r={r}, dims={dims[0]}x{dims[1]})")
    if too_big:
        warnings.warn(
            f"rank exceeds min(d_in, d_out) for {len(too_big)} layer(s): {', '.join(too_big[:3])}"
            f"{' ...' if len(too_big) > 3 else ''}. The update cannot use more rank than that, so the extra "
            "parameters are wasted; lower r or rank_pattern for these layers.",
            stacklevel=3,
        )


def _dims(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv2d):  # the update's rank is bounded by the unfolded input size
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels
    if isinstance(getattr(module, "in_features", None), int):  # nn.Linear, also with a packed quantized weight
        return module.out_features, module.in_features
    weight = getattr(module, "weight", None)
    return tuple(weight.shape[:2]) if weight is not None and weight.dim() == 2 else None
