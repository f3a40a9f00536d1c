"""The new-run form: its fields from the train config's reference, and the check of what a user filled in.

The fields, defaults and help texts are those of ``docs/config-reference.md`` (``lorakit.train.config``),
so the form and the docs cannot drift apart. A value arrives as the text of its input and is read like
``--set key=value`` (YAML), so the form is the command line with boxes. ``check_form`` gives every problem
next to its field: a wrong type or range, a path outside the runs / data directories, or a combination the
trainer would refuse (attached to each key the message names).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import durable, hub
from ..data import as_hub_dataset
from ..train.config import (
    CHOICES,
    RunConfig,
    apply_override,
    field_kind,
    from_dict,
    load_config,
    reference,
    resolve_paths,
)
from .runs import LAUNCH_FILE, PathRefused, Workspace

HIDDEN = {"output_dir", "overwrite"}  # set by the dashboard: the run's directory under --runs
SECTIONS = {"": "Run", "data": "Data", "lora": "LoRA", "train": "Training", "dpo": "Preference tuning (dpo / orpo)",
            "compare": "Compare"}  # fmt: skip
FORM_SECTIONS = ("", "data", "lora", "train", "dpo")  # compare.* configure `lorakit compare`, not a training run
GENERAL = "_"
PATH_KEYS = (
    "model",
    "data.train",
    "data.eval",
    "dpo.reference_adapter",
    "train.tracking_uri",
)  # the key of an error that belongs to no single field


def form_fields(model: str | None = None) -> list[dict[str, Any]]:
    """Every key a run's form offers: key, section, default, help, kind (bool | int | float | str | choice |
    yaml), its choices and whether it may be left unset. ``model``: the dashboard's model, the form's default."""
    fields = []
    for key, default, help_text in reference():
        if key == "model" and model is not None:
            default = model
        section = key.rsplit(".", 1)[0] if "." in key else ""
        if key in HIDDEN or section not in FORM_SECTIONS:
            continue
        kind, optional = field_kind(key)
        fields.append({
            "key": key, "section": section, "section_title": SECTIONS[section], "default": default,
            "default_text": as_text(default), "help": help_text, "kind": kind,
            "choices": list(CHOICES.get(key, ())), "optional": optional,
        })  # fmt: skip
    return fields


def as_text(value: Any) -> str:
    """A value as the text a form input holds (and ``--set`` reads back to the same value)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@dataclass
class FormResult:
    config: RunConfig | None
    data: dict[str, Any]  # the nested config of the values given (what the YAML file holds)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.config is not None and not self.errors

    @property
    def yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)


def parse_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The form's values as a nested config (text read like ``--set``), and the unknown keys."""
    known = {f["key"] for f in form_fields()}
    data: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, value in values.items():
        if key not in known:
            errors[str(key)] = f"unknown field {key!r}" + (" (set by the dashboard)" if key in HIDDEN else "")
            continue
        try:
            if isinstance(value, str):
                apply_override(data, f"{key}={value}")  # text is read as --set reads it
            else:
                _set(data, key, value)  # JSON numbers and booleans as they came
        except ValueError as err:
            errors[key] = str(err)
    return data, errors


def check_form(values: dict[str, Any], ws: Workspace, model: str, name: str | None = None) -> FormResult:
    """The config the values make, or the problems, each under its key (``name`` for the run name)."""
    data, errors = parse_values(values)
    data = {"model": model, **data}  # the dashboard's model unless the form names another
    for key in [k for k in values if k not in errors]:
        single: dict[str, Any] = {}
        _set(single, key, _get(data, key))
        try:
            from_dict(RunConfig, single, "")
        except ValueError as err:
            if set(keys_named(str(err))) <= {key}:  # a combination with other keys is judged on the whole form
                errors[key] = str(err)
    if name is not None:
        try:
            d = ws.run_dir(name, must_exist=False)
            if d == ws.data_dir or d.is_relative_to(ws.data_dir):
                errors["name"] = f"run {name!r} would be inside the data directory {ws.data_dir}; choose another name"
            elif d.exists() and any(d.iterdir()):
                errors["name"] = f"run {name!r} already exists in {ws.root}; choose another name"
        except PathRefused as err:
            errors["name"] = str(err)
    config = None
    if not errors:
        try:
            config = from_dict(RunConfig, data, "")
        except ValueError as err:
            for key in keys_named(str(err)) or [GENERAL]:
                errors[key] = str(err)
    for key, message in check_paths(config or _paths_only(data), ws, model).items():
        errors.setdefault(key, message)
    if name is not None:
        data = {**data, "output_dir": name}
    return FormResult(config if not errors else None, data, errors)


def _paths_only(data: dict[str, Any]) -> RunConfig:
    """The defaults with the form's path values (to check those while other fields are still wrong)."""
    config = RunConfig()
    for key in PATH_KEYS:
        try:
            value = _get(data, key)
        except (KeyError, TypeError):
            continue
        if isinstance(value, str):
            section, _, attr = key.rpartition(".")
            setattr(getattr(config, section) if section else config, attr, value)
    return config


def check_paths(config: RunConfig, ws: Workspace, model: str) -> dict[str, str]:
    """The paths a run reads, confined: data inside the runs or data directory, the model the dashboard's own
    (or a model directory inside the runs directory), no tracking store elsewhere."""
    errors = {}
    if not config.data.train:
        errors["data.train"] = (
            "choose the training data: a file or saved dataset in the data directory, or a Hugging Face Hub dataset "
            "id (org/name, org/name:config[split])"
        )
    for key, value in (("data.train", config.data.train), ("data.eval", config.data.eval),
                       ("dpo.reference_adapter", config.dpo.reference_adapter)):  # fmt: skip
        if not value or key in errors:
            continue
        if key.startswith("data.") and _hub_dataset(ws, value):
            continue  # the run loads it through the Hugging Face caches
        try:
            path = ws.data_path(value, key)
        except PathRefused as err:
            errors[key] = str(err)
            continue
        if not path.exists():
            errors[key] = f"{key} {value!r} does not exist in {ws.root}"
    if config.model not in ("default", model) and not _hub_id(ws, config.model):
        try:
            if not ws.data_path(config.model, "model").is_dir():
                errors["model"] = f"model {config.model!r} is not a model directory nor a Hugging Face Hub id"
        except PathRefused:
            errors["model"] = (
                f"model {config.model!r}: the dashboard trains on its own model ({model}), a Hugging Face Hub id "
                f"(org/name) or a model directory inside {ws.root}"
            )
    uri = config.train.tracking_uri
    if uri and not re.match(r"^https?://", uri):
        errors["train.tracking_uri"] = (
            f"train.tracking_uri {uri!r}: the dashboard accepts an http(s) tracking server only; leave it unset "
            "for the run's own store"
        )
    return errors


def _hub_dataset(ws: Workspace, value: str) -> bool:
    """Whether ``value`` names a Hugging Face Hub dataset (org/name:config[split]) rather than a path in the
    workspace."""
    return not (ws.root / value).exists() and as_hub_dataset(value) is not None


def _hub_id(ws: Workspace, value: str) -> bool:
    """Whether ``value`` names a Hugging Face Hub model (org/name[@rev][:file.gguf]) rather than a path in the
    workspace: the run resolves it through the Hugging Face cache."""
    return not (ws.root / value).exists() and hub.parse(value) is not None


def keys_named(message: str) -> list[str]:
    """The config keys a message speaks of (a cross-field error names each key it involves)."""
    keys = [f["key"] for f in form_fields()]
    named = [k for k in keys if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message)]
    return [k for k in named if not any(other != k and other.endswith("." + k) for other in named)]


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _get(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def launch_file(ws: Workspace, name: str, result: FormResult) -> Path:
    """Write the run's config into its new directory (``launch.yaml``). The form's paths are relative to the
    runs directory; a config file's are read against its own directory, so they are written absolute."""
    d = ws.run_dir(name, must_exist=False)
    d.mkdir(parents=True, exist_ok=True)
    data = copy.deepcopy(result.data)
    resolve_paths(data, ws.root)
    path = d / LAUNCH_FILE
    durable.write_text(path, "# written by lorakit ui\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def config_paths_ok(path: Path, ws: Workspace, model: str) -> RunConfig:
    """A run's own config file, re-read and confined before a resume (a config written elsewhere may name
    paths outside the runs directory)."""
    config = load_config(path)
    errors = check_paths(config, ws, model)
    if errors:
        raise PathRefused("; ".join(errors.values()))
    return config
