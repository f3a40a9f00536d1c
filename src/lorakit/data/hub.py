"""Training data by Hugging Face Hub dataset id: ``org/name``, ``org/name:config``, ``org/name[split]``,
``org/name:config[split]``, with ``@revision`` after the name (``org/name@v1.0:config[split]``), or a bare
``name``. A value written as a path (a data file suffix, or ``./``, ``../``, ``/``, ``~`` in front) is never an id,
and a path that exists always wins (``readers.read_rows`` looks first).

The dataset loads with ``datasets.load_dataset`` through the standard caches (HF_HOME, HF_HUB_CACHE,
HF_DATASETS_CACHE): online, what is missing downloads into the hub cache (datasets' progress bars) and is
prepared in the datasets cache. Offline (HF_HUB_OFFLINE=1), ``load_dataset(id)`` of datasets 5 does not read the
hub cache, only a copy it prepared before; so offline, and online when the Hub cannot be reached, the repository
is looked up in the hub cache with ``huggingface_hub.snapshot_download(local_files_only=True)`` (the layout that
``hf download`` and an online ``load_dataset`` leave: ``datasets--org--name/refs/<revision>`` naming a commit,
``snapshots/<commit>/...`` its files) and that snapshot directory loaded with ``load_dataset(dir, config)``;
failing that (offline), ``load_dataset(id)`` reads datasets' own prepared copy (``org___name/<config>/...`` in
HF_DATASETS_CACHE). Every failure is one line naming the id and the fix.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAIN_SPLITS = ("train",)
"""The split of a Hub id written without one, for training data."""

EVAL_SPLITS = ("validation", "test")
"""The split of a Hub id written without one, for evaluation data: the first of these the dataset has."""

PATH_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt")
"""A value ending in one of these is a file path, never a Hub id (a missing file is reported as missing)."""

_ID = re.compile(
    r"(?P<repo>[\w.-]+(?:/[\w.-]+)?)"  # org/name or name
    r"(?:@(?P<revision>[^\s:\[\]@]+))?"  # @branch, @tag, @commit (refs/pr/1 too)
    r"(?::(?P<config>[^\s:\[\]@/]+))?"
    r"(?:\[(?P<split>[\w.-]+)\])?"
)


@dataclass(frozen=True)
class HubDataset:
    """A dataset of the Hugging Face Hub as a config value names it."""

    repo: str
    config: str | None = None
    split: str | None = None
    revision: str | None = None

    def label(self, split: str | None = None) -> str:
        """The id as written (``split``: in place of the one written), e.g. ``org/name:config[train]``."""
        text = self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.config}" if self.config else "")
        split = split or self.split
        return f"{text}[{split}]" if split else text


def looks_like_path(value: str) -> bool:
    """Whether ``value`` is written as a file path: a data file suffix, or ./ ../ / ~ in front."""
    text = str(value).strip()
    if text in (".", "..") or text.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    return Path(text).suffix.lower() in PATH_SUFFIXES


def as_hub_dataset(value: Any) -> HubDataset | None:
    """The Hub dataset ``value`` names, or None where it is written as a path or is no valid id. Whether a local
    path of that name exists is the caller's question (it always wins)."""
    text = str(value).strip() if isinstance(value, str | Path) else ""
    if not text or looks_like_path(text):
        return None
    match = _ID.fullmatch(text)
    if match is None:
        return None
    repo = match["repo"]
    parts = repo.split("/")
    if len(repo) > 96 or "--" in repo or ".." in repo or any(p[0] in "-." or p[-1] in "-." for p in parts):
        return None  # the Hub's own rules for repository names
    return HubDataset(repo, match["config"], match["split"], match["revision"])


def hub_offline() -> bool:
    """Whether the Hugging Face libraries are in offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, read by
    them at import)."""
    import datasets.config
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_hub_split(
    ref: HubDataset, splits: tuple[str, ...] = TRAIN_SPLITS, log: Callable[[str], None] | None = None
) -> tuple[str, Any]:
    """(label, ``datasets.Dataset``) of the split ``ref`` names, else of the first of ``splits`` the dataset has;
    the label names the split (``org/name:config[train]``). Logs the split taken and the row count."""
    log = log or _stderr
    loaded = _load(ref, log)
    names = list(loaded)
    if ref.split is not None:
        if ref.split not in loaded:
            raise ValueError(
                f"{ref.label()}: the dataset has no split {ref.split!r}; its splits: {', '.join(names)} "
                f"(e.g. {ref.label(names[0])})"
            )
        split, note = ref.split, ""
    else:
        split = next((s for s in splits if s in loaded), None)
        if split is None:
            raise ValueError(
                f"{ref.label()}: the dataset has no {' or '.join(splits)} split; its splits: {', '.join(names)}: "
                f"name one, e.g. {ref.label(names[0])}"
            )
        note = f" (no split given: {split}" + (
            f", the first of {', '.join(splits)} it has)" if len(splits) > 1 else ")"
        )
    dataset = loaded[split]
    log(
        f"{ref.label(split)}: {len(dataset)} row{'s' if len(dataset) != 1 else ''} from the Hugging Face Hub dataset{note}"
    )
    return ref.label(split), dataset


def check_hub_dataset(ref: HubDataset) -> None:
    """Offline, refuse at once (before a model loads) a dataset that is in no cache; online there is nothing to
    check before the download, which reports its own problems."""
    if hub_offline() and cached_snapshot(ref) is None:
        _load(ref, lambda message: None)  # datasets' own prepared copy, else the error that says what to do


def cached_snapshot(ref: HubDataset) -> str | None:
    """The directory of ``ref``'s revision in the hub cache (HF_HUB_CACHE), or None; never uses the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return snapshot_download(ref.repo, repo_type="dataset", revision=ref.revision, local_files_only=True)
    except IncompleteSnapshotError as err:
        return err.snapshot_path  # the files of some configs only (as load_dataset downloads): may be enough
    except (LocalEntryNotFoundError, ValueError):
        return None


def _load(ref: HubDataset, log: Callable[[str], None]) -> Any:
    """The ``datasets.DatasetDict`` of ``ref``'s config: see the module docstring for the order of the caches."""
    offline = hub_offline()
    if offline:
        reason = "offline mode is on (HF_HUB_OFFLINE=1)"
    else:
        try:
            return _load_dict(ref, ref.repo, ref.revision)
        except Exception as err:  # datasets and huggingface_hub raise many types; each is sorted below
            if not _unreachable(err):
                raise _explained(err, ref) from None
            reason = f"the Hugging Face Hub could not be reached ({type(err).__name__}: {_one_line(err)})"
    snapshot = cached_snapshot(ref)
    if snapshot is not None:
        if not offline:
            log(f"{ref.label()}: {reason}; reading the cached copy in {snapshot}")
        try:
            return _load_dict(ref, snapshot, None)
        except Exception as err:
            explained = _explained(err, ref, snapshot)
            if _is_config_error(err):
                raise explained from None
            raise ValueError(
                f"{ref.label()}: the cached copy in {snapshot} could not be read ({_one_line(err)}); it may be "
                f"incomplete: download it again where the Hub can be reached ({_download_command(ref)})"
            ) from None
    if offline:
        try:
            return _load_dict(ref, ref.repo, ref.revision)  # offline, datasets reads its own prepared copy
        except Exception as err:
            if _is_config_error(err):
                raise _explained(err, ref) from None
    raise ValueError(_not_cached(ref, reason))


def _load_dict(ref: HubDataset, path: str, revision: str | None) -> Any:
    import datasets

    loaded = datasets.load_dataset(path, ref.config, revision=revision)
    if not isinstance(loaded, datasets.DatasetDict):  # load_dataset without split= gives every split
        raise ValueError(f"{ref.label()}: expected the dataset's splits, got {type(loaded).__name__}")
    return loaded


def _not_cached(ref: HubDataset, reason: str) -> str:
    import datasets.config
    from huggingface_hub import constants

    at = f" at revision {ref.revision}" if ref.revision else ""
    return (
        f"{ref.label()}: {reason}, and the Hugging Face Hub dataset {ref.repo}{at} is not in the local cache "
        f"(HF_HUB_CACHE={constants.HF_HUB_CACHE}, HF_DATASETS_CACHE={datasets.config.HF_DATASETS_CACHE}); download "
        f"it on a machine with network ({_download_command(ref)}) and copy that cache here, or point HF_HOME or "
        "HF_HUB_CACHE at a copy; or use a local data file (no local file or directory of that name exists either)"
    )


def _download_command(ref: HubDataset) -> str:
    revision = f" --revision {ref.revision}" if ref.revision else ""
    return f"`hf download {ref.repo} --repo-type dataset{revision}`"


def _is_config_error(err: Exception) -> bool:
    message = str(err)
    return isinstance(err, ValueError) and (
        "Config name is missing" in message or ("BuilderConfig" in message and "not found" in message)
    )


def _explained(err: Exception, ref: HubDataset, path: str | None = None) -> ValueError:
    """One line for a failure of ``load_dataset``: the id, what went wrong and what to do."""
    message = _one_line(err)
    if _is_config_error(err):
        names = _config_names(path or ref.repo, ref)
        if not names:
            return ValueError(f"{ref.label()}: {message}")
        example = HubDataset(ref.repo, names[0], ref.split, ref.revision).label()
        if ref.config is None:
            return ValueError(
                f"{ref.label()}: the dataset has several configs ({', '.join(names)}): name one, e.g. {example}"
            )
        return ValueError(f"{ref.label()}: no config {ref.config!r}; its configs: {', '.join(names)} (e.g. {example})")
    kind = type(err).__name__
    if "gated" in message.lower() or kind == "GatedRepoError":
        return ValueError(
            f"{ref.label()}: {message} Accept its conditions at https://huggingface.co/datasets/{ref.repo}, then log "
            "in with `hf auth login` or set HF_TOKEN to a token of that account"
        )
    if "Revision" in message and ref.revision:
        return ValueError(f"{ref.label()}: {message} (name a branch, tag or commit of the dataset after @)")
    if kind in ("DatasetNotFoundError", "RepositoryNotFoundError") or "on the Hugging Face Hub either" in message:
        return ValueError(
            f"{ref.label()}: no dataset of that id on the Hugging Face Hub, or a private one ({message}); check the "
            "id (org/name), or log in with `hf auth login` or set HF_TOKEN for a private dataset (no local file or "
            "directory of that name exists either)"
        )
    return ValueError(f"{ref.label()}: the Hugging Face dataset could not be loaded ({kind}: {message})")


def _config_names(path: str, ref: HubDataset) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_config_names(path, revision=ref.revision if path == ref.repo else None))
    except Exception:  # only for the message: without the names it names none
        return []


_NETWORK_ERRORS = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException", "NetworkError",
    "RemoteProtocolError", "ProxyError", "Timeout", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
}  # fmt: skip


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or its cause) says the Hub could not be reached: no network, a timeout, the Hub down."""
    for e in (err, err.__cause__, err.__context__):
        if e is None:
            continue
        if isinstance(e, ConnectionError | TimeoutError) or type(e).__name__ in _NETWORK_ERRORS:
            return True
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int) and status >= 500:
            return True
    return False


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
