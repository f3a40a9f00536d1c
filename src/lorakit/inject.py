"""Adding adapters to a model: wrap the targeted layers, add the adapter's tensors, set what trains."""

from __future__ import annotations

from torch import nn

from ._bnb import keep_plain_layout
from .config import LoraConfig
from .layers import AdapterDtype, LoraLayer, ModulesToSave, check_adapter_dtype, is_linear_like, link_shared_inputs
from .state import AdapterInfo, adapter_modules, registry, set_submodule
from .targeting import find_modules_to_save, find_targets, sample, warn_large_ranks, wrapper_class


def inject(
    model: nn.Module, config: LoraConfig, name: str = "default", *, adapter_dtype: AdapterDtype = None
) -> nn.Module:
    """Add LoRA adapter ``name`` to ``model`` in place and make it the active, trainable adapter.

    Args:
        model: any ``torch.nn.Module``; its class does not change, so ``generate()`` and friends still work.
        config: the adapter's ``LoraConfig``.
        name: adapter name, unique on this model.
        adapter_dtype: the dtype of the adapter's tensors (A and B, DoRA magnitudes, PiSSA's initial factors,
            ``modules_to_save`` copies). ``None`` (default): float32 where the base layer is bfloat16 or
            float16 (its weight's dtype, or a quantized layer's compute dtype), else the base's dtype: what
            trains stays float32 (PEFT's ``autocast_adapter_dtype=True``). Run the forward under
            ``torch.autocast`` for the products in the base's dtype; without autocast each update is computed
            in float32 and cast back to the layer's output dtype (a ``modules_to_save`` copy casts its input
            to its dtype and its output back). ``"base"``: the base layer's dtype (all-bf16 training). A
            ``torch.dtype``: that dtype. Biases that ``config.bias`` trains are the base's own parameters and
            keep their dtype.

    Returns:
        The same model object. Everything but the active adapter's parameters (and the biases or
        modules that ``config.bias`` / ``config.modules_to_save`` name) is frozen.

    Raises:
        TypeError: ``config`` is not a LoraConfig.
        ValueError: the name is in use or invalid; ``adapter_dtype`` is none of the above; a target entry
            matches nothing (the message suggests close module names); a matched module has an unsupported
            type; a matched module's weight is tied to the input embedding (an output head under
            ``tie_word_embeddings``: such an adapter could not be merged nor exported to GGUF; "all-linear"
            leaves the head out).
    """
    check_new_name(model, name)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    check_adapter_dtype(adapter_dtype)
    saved = find_modules_to_save(model, config.modules_to_save or [], strict=True)
    targets = find_targets(model, config, skip=saved, strict=True)
    warn_large_ranks(model, config, targets)
    add_adapter_layers(model, config, name, targets, saved, adapter_dtype=adapter_dtype)
    activate(model, [name])
    return model


def add_adapter_layers(
    model: nn.Module,
    config: LoraConfig,
    name: str,
    targets: list[str],
    saved: list[str],
    *,
    adapter_dtype: AdapterDtype = None,
) -> None:
    """Wrap (or reuse wrappers of) ``targets`` and ``saved`` and add the adapter's tensors, in the dtype
    ``adapter_dtype`` gives for each layer (see ``inject``); records it."""
    reg = registry(model, create=True)
    _check_variants(model, config, targets)
    for module in model.modules():  # gradients must pass every 4-bit layer, wrapped or not (lorakit._bnb)
        keep_plain_layout(module)
    for path in targets:
        layer = _wrap(model, path, _lora_wrapper)
        r, alpha = config.rank_and_alpha(path)
        scaling = config.scaling(r, alpha)
        layer.add_adapter(
            name, r, alpha, scaling, config.dropout, config.init, config.use_dora, adapter_dtype=adapter_dtype
        )
    for path in saved:
        _wrap(model, path, ModulesToSave).add_adapter(name, adapter_dtype=adapter_dtype)
    reg.adapters[name] = AdapterInfo(config=config, targets=targets, saved_modules=saved)
    link_shared_inputs(model)


def _check_variants(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """DoRA and PiSSA need linear layers: refuse before anything is wrapped."""
    if not (config.use_dora or config.init == "pissa"):
        return
    other = [p for p in targets if not is_linear_like(model.get_submodule(p))]
    if other:
        what = "use_dora" if config.use_dora else "init='pissa'"
        kinds = sorted({type(model.get_submodule(p)).__name__ for p in other})
        raise ValueError(
            f"{what} applies to linear layers only, but the targets include {sample(other)} ({', '.join(kinds)}); "
            "narrow target_modules to linear layers"
        )


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r} is invalid: use a non-empty name without dots")
    reg = model.__dict__.get("_lorakit_registry")
    if reg is not None and name in reg.adapters:
        raise ValueError(
            f"adapter name {name!r} is already in use on this model; pick another name or remove it first "
            f"with lorakit.delete_adapter(model, {name!r})"
        )


def activate(model: nn.Module, names: list[str]) -> None:
    """Make ``names`` (checked by the caller) the active adapters of every wrapper; only they train."""
    registry(model).active = list(names)
    for _, module in adapter_modules(model):
        module.active_adapters = [n for n in names if n in module.adapter_names]
    update_trainable(model)


def _lora_wrapper(module: nn.Module) -> LoraLayer:
    return wrapper_class(module)(module)


def _wrap(model: nn.Module, path: str, factory) -> nn.Module:
    module = model.get_submodule(path)
    if isinstance(module, LoraLayer | ModulesToSave):
        return module
    wrapper = factory(module)
    wrapper.train(module.training)  # an eval-mode model stays in eval mode (no LoRA dropout at inference)
    set_submodule(model, path, wrapper)
    return wrapper


def update_trainable(model: nn.Module) -> None:
    """requires_grad: on for the active, trainable adapters (and their biases / saved modules), off elsewhere."""
    reg = registry(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in reg.active:
        info = reg.adapters[name]
        if not info.trainable:
            continue
        for path in info.targets + info.saved_modules:
            for param in model.get_submodule(path).adapter_parameters(name):
                param.requires_grad_(True)
        for param in bias_parameters(model, info).values():
            param.requires_grad_(True)


def bias_parameters(model: nn.Module, info: AdapterInfo) -> dict[str, nn.Parameter]:
    """The biases an adapter trains (``config.bias``), by their path in the wrapped model."""
    if info.config.bias == "none":
        return {}
    if info.config.bias == "lora_only":
        found = {}
        for path in info.targets:
            bias = getattr(model.get_submodule(path).base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                found[f"{path}.base_layer.bias"] = bias
        return found
    skip = [p for p, _ in adapter_modules(model)]
    return {n: p for n, p in model.named_parameters() if n.endswith("bias") and not _is_adapter_copy(n, skip)}


def _is_adapter_copy(param_path: str, wrapper_paths: list[str]) -> bool:
    inner = (".lora_", ".modules_to_save.", ".original_module.")
    return any(param_path.startswith(w + part) for w in wrapper_paths for part in inner)
