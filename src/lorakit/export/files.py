"""Writing export artifacts so that a failure leaves nothing behind: a GGUF file or a whole directory is
built beside its target, checked there, and moved into place only once complete and checked.

``staged_file`` and ``staged_directory`` give the export a place beside ``--out`` to write into; whatever runs
inside them (the writer, then the parity checks) reads the staged artifact. Only when all of it succeeds does
the artifact replace ``--out``; on any error, or an interrupt, the staged artifact is removed, ``--out`` keeps
what it held before (its previous contents with ``--overwrite``, or nothing), and folders the export created
for ``--out`` are removed again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..io import commit_file, fsync_dir, fsync_files


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
        commit_file(tmp, out)
    except OSError as err:
        raise _cannot_write(out, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def check_target(out: Path, overwrite: bool, *, directory: bool) -> None:
    """Refuse an ``out`` this export may not replace, before anything is written: an existing one without
    ``overwrite``, and a directory where the export is one file (replacing a folder by a file would delete
    everything in it, which --overwrite is not meant to do)."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if not directory and out.is_dir():
        raise ValueError(f"{out} is a directory, and this export is one file: choose a file path for --out")


@contextmanager
def staged_file(out: Path, overwrite: bool) -> Iterator[Path]:
    """A path beside ``out`` to write one file at; on a clean exit the file replaces ``out`` (one atomic
    rename), on an error it is removed and ``out`` is left as it was. The staged name keeps ``out``'s suffix,
    for readers that look at it."""
    check_target(out, overwrite, directory=False)
    tmp = out.with_name(f".{out.name}.staged-{os.getpid()}{out.suffix}")
    with _parents_of(out):
        tmp.unlink(missing_ok=True)  # a leftover of a killed run with this process id
        try:
            yield tmp
            _commit_file(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def staged_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """An empty directory beside ``out`` to fill; on a clean exit it replaces ``out``, on an error it is
    removed and ``out`` is left as it was."""
    check_target(out, overwrite, directory=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    with _parents_of(out):
        _remove(tmp)  # leftovers of a killed run with this process id
        _remove(old)
        try:
            try:
                tmp.mkdir()
            except OSError as err:
                raise _cannot_write(out, err) from None
            yield tmp
            _commit_directory(tmp, out, old)
        finally:
            _remove(tmp)
            _put_back(old, out)
    _remove(old)  # the replaced --out, only once the new one is in place


def place(source: Path, target: Path) -> None:
    """``source`` at ``target``: a hard link when both lie on one file system, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _commit_file(tmp: Path, out: Path) -> None:
    """``tmp`` (complete and checked) replaces ``out`` in one atomic rename, made durable."""
    try:
        commit_file(tmp, out)
    except OSError as err:
        raise _cannot_write(out, err) from None


def _commit_directory(tmp: Path, out: Path, old: Path) -> None:
    """``tmp`` replaces ``out`` in two renames (a directory cannot replace another atomically): an existing
    ``out`` is first moved aside to ``old``, which the caller puts back should the second rename fail or be cut
    short (``_put_back``), and removes once the new ``out`` is in place."""
    fsync_files(tmp)
    try:
        if out.exists() or out.is_symlink():
            out.rename(old)
        tmp.rename(out)
    except OSError as err:
        raise _cannot_write(out, err) from None
    fsync_dir(out.parent)


def _put_back(old: Path, out: Path) -> None:
    """The previous ``out``, moved aside to ``old``, back in its place when the new one never got there."""
    if (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
        with contextlib.suppress(OSError):  # nothing more to do; the error that got here is the one to report
            old.rename(out)


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


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree at ``path``, if any."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _cannot_write(out: Path, err: OSError) -> ValueError:
    return ValueError(f"cannot write {out}: {err.strerror or err}; choose a writable --out")
