"""A Hugging Face cache on disk in the Hub's own layout, for tests without a network.

``add_repo`` writes what a download leaves in ``$HF_HUB_CACHE``: ``models--org--name/blobs/<sha256>`` holding
the contents, ``snapshots/<commit>/<file>`` as relative symbolic links to the blobs, and ``refs/<branch>``
holding the commit. ``offline_hub`` points huggingface_hub at such a cache (the environment variables and the
constants huggingface_hub read from them when it was imported) with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest


def add_repo(
    cache: Path, repo: str, files: dict[str, bytes | Path], *, ref: str = "main", kind: str = "models", seed: str = ""
) -> str:
    """Store ``files`` (name -> contents, or a file to copy) as revision ``ref`` of ``repo``; returns the commit."""
    storage = cache / f"{kind}--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}:{ref}:{seed}:{sorted(files)}".encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for name, contents in files.items():
        data = contents.read_bytes() if isinstance(contents, Path) else contents
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return commit


def model_files(directory: Path) -> dict[str, Path]:
    """Every file of a saved model directory, by name."""
    return {p.name: p for p in sorted(Path(directory).iterdir()) if p.is_file()}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache under tmp_path, HF_HOME pointing above it, HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", home), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield cache
    shutil.rmtree(home, ignore_errors=True)
