"""Writing export artifacts so that a failure leaves nothing behind: a GGUF file or a whole directory is
built beside its target, checked there, and moved into place only once complete and checked.

``staged_file`` and ``staged_directory`` give the export a place beside ``--out`` to write into; whatever runs
inside them (the writer, then the parity checks) reads the staged artifact. Only when all of it succeeds does
the artifact replace ``--out`` (``lorakit.durable``: synced, swapped in, the previous ``--out`` removed only once
the new one is in place, so that even a crash leaves one of them whole); on any error, or an interrupt, the staged
artifact is removed, ``--out`` keeps what it held before (its previous contents with ``--overwrite``, or
nothing), and folders the export created for ``--out`` are removed again.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from .. import durable


def write_gguf(out: Path, arch: str, fill: Callable[[Any], None]) -> None:
    """Write a GGUF file at ``out`` atomically: ``fill(writer)`` adds its keys and tensors to a ``GGUFWriter``
    on a temporary file that replaces ``out`` only once complete (``durable.replace_file``)."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with durable.replace_file(out) as tmp:
            writer = gguf.GGUFWriter(str(tmp), arch)
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as err:
        raise _cannot_write(out, err) from None


def check_target(out: Path, overwrite: bool, *, directory: bool) -> None:
    """Refuse an ``out`` this export may not replace, before anything is written: an existing one without
    ``overwrite``, and a directory where the export is one file (replacing a folder by a file would delete
    everything in it, which --overwrite is not meant to do). An ``out`` that a crash left renamed aside, in the
    middle of being replaced, is put back first."""
    durable.recover(out.parent, out.name, clean=False)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if not directory and out.is_dir():
        raise ValueError(f"{out} is a directory, and this export is one file: choose a file path for --out")


@contextmanager
def staged_file(out: Path, overwrite: bool) -> Iterator[Path]:
    """A path beside ``out`` to write one file at; on a clean exit the file replaces ``out`` (one atomic
    rename, made durable), on an error it is removed and ``out`` is left as it was. The staged name keeps
    ``out``'s suffix, for readers that look at it."""
    check_target(out, overwrite, directory=False)
    with _parents_of(out):
        yield from _staged(out, durable.replace_file(out, suffix=out.suffix))


@contextmanager
def staged_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """An empty directory beside ``out`` to fill; on a clean exit it replaces ``out``, on an error it is
    removed and ``out`` is left as it was."""
    check_target(out, overwrite, directory=True)
    with _parents_of(out):
        yield from _staged(out, durable.replace_dir(out))


def _staged(out: Path, stage: AbstractContextManager[Path]) -> Iterator[Path]:
    """Yield ``stage``'s staged path; a write error of the staging or of the move into place is reported as
    ``cannot write OUT``, errors of the export itself (run while the path is yielded) as they are."""
    exporting = False
    try:
        with stage as tmp:
            exporting = True
            yield tmp
            exporting = False
    except OSError as err:
        if exporting:
            raise
        raise _cannot_write(out, err) from None


def place(source: Path, target: Path) -> None:
    """``source`` at ``target``: a hard link when both lie on one file system, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextmanager
def _parents_of(out: Path) -> Iterator[None]:
    """Create ``out``'s missing parent folders; should the export then fail, remove those it created (when
    still empty), so that a failed command leaves no trace."""
    made = [p for p in reversed(out.parent.parents) if not p.exists()]
    made += [] if out.parent.exists() else [out.parent]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(out, err) from None
    try:
        yield
    except BaseException:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (someone else wrote there) or not ours to remove
        raise


def _cannot_write(out: Path, err: OSError) -> ValueError:
    return ValueError(f"cannot write {out}: {err.strerror or err}; choose a writable --out")
