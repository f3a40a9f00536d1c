"""Models by their Hugging Face Hub id, resolved the way the rest of the ecosystem does it: through
``huggingface_hub`` and its standard cache (``HF_HOME``, ``HF_HUB_CACHE``), so that a model already cached
loads offline and a missing one downloads (with progress bars) when the network is there.

A model spec is ``org/name``, with an optional revision ``org/name@rev`` (branch, tag or commit) and an optional
GGUF file inside the repo ``org/name:file.gguf`` (``org/name@rev:file.gguf``). Only safetensors weights are
fetched: pickled ``.bin`` / ``.pt`` checkpoints can run code when loaded, so a repo holding only those is refused.
The token is huggingface_hub's: ``HF_TOKEN`` or the one ``hf auth login`` stored. Every failure is one
``ValueError`` line naming the id and what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# What a model needs from a repo: its config, safetensors weights (and their index), tokenizer files and chat
# template. Not pickles, ONNX, GGUF or the "original/" checkpoints some repos carry besides.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)"
    r"(?:@(?P<revision>[A-Za-z0-9_./-]+?))?"
    r"(?::(?P<file>[^:@]+\.gguf))?"
)


@dataclass(frozen=True)
class HubModel:
    """A model named by its Hub id: the repo, a revision (None: the default branch), a GGUF file inside it."""

    repo: str
    revision: str | None = None
    gguf_file: str | None = None

    def __str__(self) -> str:
        return (
            self.repo
            + (f"@{self.revision}" if self.revision else "")
            + (f":{self.gguf_file}" if self.gguf_file else "")
        )


def parse(spec: str | os.PathLike, revision: str | None = None, gguf_file: str | None = None) -> HubModel | None:
    """The Hub model ``spec`` names, or None when it is not one: an existing local path, something with a
    path's shape (``./x``, ``/x``, ``~/x``, ``a/b/c``), or not an ``org/name`` id. ``revision`` / ``gguf_file``
    (the config keys) add to the spec; given both ways they must agree."""
    text = str(spec)
    if text.startswith((".", "/", "~")) or Path(text).expanduser().exists():
        return None
    match = _ID.fullmatch(text)
    if match is None:
        return None
    model = HubModel(match["repo"], match["revision"], match["file"])
    for key, given, inline in (("revision", revision, model.revision), ("gguf_file", gguf_file, model.gguf_file)):
        if given and inline and given != inline:
            raise ValueError(f"model {text!r} names {key} {inline!r} but {key}={given!r}: give it one way")
    return HubModel(model.repo, revision or model.revision, gguf_file or model.gguf_file)


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def model_path(model: HubModel) -> Path:
    """The local path of ``model``: the snapshot directory holding its config, safetensors weights and
    tokenizer, or the GGUF file it names; from the cache, downloaded into it when missing and online.

    Raises:
        ValueError: not cached while offline or unreachable, not found, access refused, no such revision or
            file, or only pickled weights.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    if model.gguf_file:
        path = _call(model, lambda: hf_hub_download(model.repo, model.gguf_file, revision=model.revision))
        return Path(path)
    folder = Path(
        _call(model, lambda: snapshot_download(model.repo, revision=model.revision, allow_patterns=MODEL_FILES))
    )
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model {model}: the repo has no config.json, so it is not a transformers model{_ggufs(model, folder)}"
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(_no_safetensors(model, folder))
    return folder


def commit_of(path: str | os.PathLike) -> str | None:
    """The commit hash of a cached snapshot path (``.../snapshots/<commit>/...``), or None for other paths."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            return parts[i + 1]
    return None


def _repo_files(model: HubModel, folder: Path) -> list[str]:
    """The repo's files at this revision: the tree listing huggingface_hub cached when it downloaded, else
    what the snapshot folder holds."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(model.repo, revision=commit_of(folder) or model.revision)]
    except Exception:  # no cached listing (a cache copied from elsewhere): the folder is what we know
        return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]


def _no_safetensors(model: HubModel, folder: Path) -> str:
    files = _repo_files(model, folder)
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return (
            f"model {model}: the repo holds only pickled weights ({', '.join(sorted(pickles)[:3])}), which lorakit "
            "does not load: unpickling can run arbitrary code. Use a revision or copy with .safetensors weights "
            "(many repos have a 'refs/pr/N' conversion; https://huggingface.co/spaces/safetensors/convert makes "
            "one), or convert a copy you trust with save_pretrained(safe_serialization=True)"
        )
    return f"model {model}: the repo has no .safetensors weights{_ggufs(model, folder)}"


def _ggufs(model: HubModel, folder: Path) -> str:
    ggufs = sorted(f for f in _repo_files(model, folder) if f.endswith(".gguf"))
    if ggufs:
        return f"; it holds GGUF files: name one as {model.repo}:{ggufs[0]} (or with the gguf_file key)"
    return ""


def _call(model: HubModel, fetch):
    """``fetch()``, with huggingface_hub's errors turned into one line naming ``model`` and the fix."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fetch()
    except GatedRepoError:
        raise ValueError(
            f"model {model.repo} is gated and this account has no access: accept its terms on "
            f"https://huggingface.co/{model.repo}, then log in (`hf auth login`, or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"model {model.repo} is neither a local directory nor a repo on the Hugging Face Hub: check the path or "
            "id, or, for a private repo, log in with an account that can read it (`hf auth login`, or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(
            f"model {model.repo} has no revision {model.revision!r}: give a branch, tag or commit it has"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 forbids downloads" if is_offline() else "the Hugging Face Hub cannot be reached"
        what = f"{model.repo} (file {model.gguf_file})" if model.gguf_file else model.repo
        raise ValueError(
            f"model {what}{'@' + model.revision if model.revision else ''} is not in the Hugging Face cache "
            f"({cache_dir()}) and {why}, nor is there a local directory of that name: download it where there is a "
            f"network (`hf download {model.repo}`) and copy the cache here (or point HF_HOME / HF_HUB_CACHE at it), "
            "or give a local model directory"
        ) from None
    except EntryNotFoundError:
        raise ValueError(
            f"model {model.repo} has no file {model.gguf_file!r}{_at(model)}: check the file name"
        ) from None
    except HfHubHTTPError as err:
        raise ValueError(f"model {model}: the Hugging Face Hub refused the download: {err}".splitlines()[0]) from None


def _at(model: HubModel) -> str:
    return f" at revision {model.revision}" if model.revision else ""
