"""Writing export artifacts so that a failure leaves nothing behind: a GGUF file or a whole directory is
built beside its target and moved into place only once complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_gguf(out: Path, arch: str, fill: Callable[[Any], None]) -> None:
    """Write a GGUF file at ``out`` atomically: ``fill(writer)`` adds its keys and tensors to a ``GGUFWriter``
    on a temporary file that replaces ``out`` only once complete."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except OSError as err:
        raise ValueError(f"cannot write {out}: {err.strerror or err}; choose a writable --out") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """An empty directory beside ``out`` to fill; on a clean exit it replaces ``out``, on an error it is
    removed and ``out`` is left as it was."""
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except OSError as err:
        raise ValueError(f"cannot write {out}: {err.strerror or err}; choose a writable --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def place(source: Path, target: Path) -> None:
    """``source`` at ``target``: a hard link when both lie on one file system, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
