"""Durable writes: at any instant, what lorakit writes is either the old output or the new one, whole.

Every writer (adapters, checkpoints, merged models, exports, the model cache, metrics, the dashboard's delete)
goes through this one recipe:

- A file (``write_bytes``, ``write_text``, ``replace_file``) is written under a temporary sibling name
  (``.NAME.tmp-PID``), synced, and renamed over NAME with ``os.replace`` (atomic); then the parent directory is
  synced, so that the rename itself survives a power cut.
- A directory (``replace_dir``, ``swap_in``) is staged in a temporary sibling directory, every file and folder in
  it synced. One directory cannot atomically replace another, so an existing NAME is first renamed aside
  (``.NAME.old-PID``), the new one renamed in, the parent synced, and only then is the old one removed.
- Several files of one directory (``write_many``) are written and synced under temporary names; then a journal
  (``.FIRST.commit-PID``, written atomically) lists the renames: that is the commit point. The renames follow,
  then the journal is removed.
- A delete (``delete``) renames NAME aside (``.NAME.del-PID``), syncs the parent, then removes the aside copy.

A crash (``kill -9``, a power cut) can leave such siblings behind; ``recover`` recognises them by name. A journal
is rolled forward (its files were complete and synced before it was written); an aside copy whose NAME is missing
is renamed back (the swap was cut between its two renames); temporaries, aside copies whose replacement is in
place and half-deleted trees are removed. Each write recovers its own target's siblings before it starts;
readers of a directory call ``recover(directory, clean=False)``, which only puts outputs back together. Leftovers
of a process that is still running (by their PID) are left alone; so are tags that are not a PID (a staging
directory shared by several processes) unless the caller owns the directory (``owner=True``).

This module imports nothing from lorakit: every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KINDS = ("commit", "old", "tmp", "del")  # the order in which ``recover`` handles them
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del|commit)-(?P<tag>\w+)(?P<suffix>\.\w+)?")
_active: set[Path] = set()  # siblings this process is writing right now: never stale, even with our own PID
_lock = threading.Lock()


# ----- names ----------------------------------------------------------------------------------------------------
def sibling(path: str | os.PathLike, kind: str, tag: str | int | None = None, suffix: str = "") -> Path:
    """The hidden sibling of ``path`` that a write of ``kind`` uses: ``.NAME.KIND-TAG[SUFFIX]`` (TAG: this PID)."""
    path = Path(path)
    assert kind in KINDS, kind
    return path.with_name(f".{path.name}.{kind}-{os.getpid() if tag is None else tag}{suffix}")


@contextmanager
def _claimed(*paths: Path) -> Iterator[None]:
    """Mark ``paths`` as in use by this process, so that no ``recover`` takes them for leftovers meanwhile."""
    with _lock:
        _active.update(paths)
    try:
        yield
    finally:
        with _lock:
            _active.difference_update(paths)


# ----- syncing --------------------------------------------------------------------------------------------------
def fsync_file(path: str | os.PathLike) -> None:
    """Flush the file at ``path`` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside directory ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """Flush every file and folder under ``directory`` (and ``directory`` itself) to disk, before it is renamed
    into place."""
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(root)


# ----- files ----------------------------------------------------------------------------------------------------
@contextmanager
def replace_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write one file at; on a clean exit it is synced and replaces ``path``
    in one atomic rename (made durable), on an error it is removed and ``path`` keeps what it held. ``suffix``:
    an ending for the temporary name, for writers that look at it."""
    path = Path(path)
    tmp = sibling(path, "tmp", suffix=suffix)
    recover(path.parent, path.name)
    with _claimed(tmp):
        try:
            yield tmp
            fsync_file(tmp)
            tmp.replace(path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file at ``path`` by ``data``, atomically and durably."""
    with replace_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace the file at ``path`` by ``text``, atomically and durably."""
    write_bytes(path, text.encode(encoding))


def write_many(files: dict[Path, bytes]) -> None:
    """Replace several files of one directory together: after a crash at any moment, and ``recover``, either all
    of them hold their new contents or all their old ones.

    Every file is written and synced under a temporary name first (a failure there, such as a full disk, leaves
    every existing file untouched), then the journal naming the renames is written: from then on the write is
    complete, whatever happens to the renames (``recover`` finishes them).

    Raises:
        ValueError: the files are not all in one directory.
    """
    items = [(Path(p), data) for p, data in files.items()]
    paths = [p for p, _ in items]
    if not paths:
        return
    parents = {p.parent for p in paths}
    if len(parents) != 1:
        raise ValueError(f"write_many writes the files of one directory; got {sorted(map(str, parents))}")
    if len(items) == 1:
        write_bytes(*items[0])
        return
    (parent,) = parents
    for path in paths:
        recover(parent, path.name)
    temps = {path: sibling(path, "tmp") for path in paths}
    journal = sibling(paths[0], "commit")
    committed = False
    with _claimed(journal, *temps.values()):
        try:
            for path, data in items:
                with open(temps[path], "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            write_text(journal, json.dumps([[temps[p].name, p.name] for p in paths]))
            committed = True  # from here on the new files are the output: recover finishes what is cut short
            _roll_forward(journal)
        finally:
            for tmp in [] if committed else temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _roll_forward(journal: Path) -> None:
    """Do the renames that ``journal`` lists (those not done yet), make them durable, then drop the journal."""
    parent = journal.parent
    try:
        renames = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        renames = []  # never happens (the journal is written atomically); without it the write never committed
    for tmp, name in renames:
        with contextlib.suppress(FileNotFoundError):  # done before the crash
            (parent / tmp).replace(parent / name)
    fsync_dir(parent)
    journal.unlink(missing_ok=True)
    fsync_dir(parent)


# ----- directories ----------------------------------------------------------------------------------------------
@contextmanager
def replace_dir(final: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary directory beside ``final`` to fill; on a clean exit it replaces ``final`` (``swap_in``),
    on an error it is removed and ``final`` keeps what it held. Missing parent folders are created."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final.parent, final.name)
    staging = sibling(final, "tmp")
    with _claimed(staging):
        remove(staging)
        staging.mkdir()
        try:
            yield staging
            swap_in(staging, final)
        finally:
            with contextlib.suppress(OSError):
                remove(staging)


def swap_in(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete directory ``staged`` (a sibling of ``final``) in the place of ``final``: everything in it
    synced, an existing ``final`` renamed aside, ``staged`` renamed in, the parent synced, and only then the old
    one removed. Should the second rename fail, the old ``final`` is put back before the error is raised."""
    staged, final = Path(staged), Path(final)
    old = sibling(final, "old")
    with _claimed(staged, old):
        recover(final.parent, final.name)
        fsync_tree(staged)
        moved = os.path.lexists(final)
        if moved:
            final.rename(old)
        try:
            staged.rename(final)
        except BaseException:
            if moved:
                with contextlib.suppress(OSError):  # the error that got here is the one to report
                    old.rename(final)
            raise
        fsync_dir(final.parent)
        if moved:
            with contextlib.suppress(OSError):  # the new output is in place; a leftover is cleaned up later
                remove(old)


def delete(path: str | os.PathLike) -> None:
    """Remove the file or directory tree at ``path`` so that a crash never leaves half of it: it is renamed aside
    (one atomic step, made durable; ``set_aside``), then removed."""
    remove(set_aside(path))


def set_aside(path: str | os.PathLike) -> Path:
    """The first step of ``delete``: rename ``path`` to a hidden sibling (``.NAME.del-PID``) and make that durable;
    return the sibling, for the caller to ``remove`` (a crash before that leaves it to ``recover``)."""
    path = Path(path)
    doomed = sibling(path, "del")
    with _claimed(doomed):
        recover(path.parent, path.name)
        path.rename(doomed)
        fsync_dir(path.parent)
    return doomed


def remove(path: str | os.PathLike) -> None:
    """Remove the file, link or directory tree at ``path``, if any (not durable: for garbage)."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# ----- recovery -------------------------------------------------------------------------------------------------
def recover(
    parent: str | os.PathLike,
    name: str | None = None,
    *,
    clean: bool = True,
    owner: bool = False,
    kinds: tuple[str, ...] = KINDS,
) -> None:
    """Deal with what crashed writes left in directory ``parent`` (only those for ``name``, and of ``kinds``, when
    given): finish committed ``write_many`` journals, rename an aside copy back where its output is missing, and
    with ``clean`` remove temporaries, aside copies whose replacement is in place, and half-deleted trees.

    Leftovers of a live process other than this one are left alone, as are those of this process's writes under
    way; with ``owner`` (no other process writes in ``parent``) the others are all stale. Best effort: a
    leftover that cannot be dealt with (permissions) stays, and the next call tries again.
    """
    parent = Path(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    found = []
    for entry in names:
        match = _LEFTOVER.fullmatch(entry)
        if not match or match["kind"] not in kinds or name not in (None, _output_of(match)):
            continue
        if _stale(parent / entry, match["tag"], owner):
            found.append((KINDS.index(match["kind"]), entry, match))
    for _, entry, match in sorted(found):
        path, final = parent / entry, parent / match["name"]
        try:
            if match["kind"] == "commit":
                _roll_forward(path)
            elif match["kind"] == "old" and not os.path.lexists(final):
                path.rename(final)  # the swap was cut between its renames: the old output goes back
                fsync_dir(parent)
            elif clean:
                remove(path)
        except OSError:
            continue


def _output_of(match: re.Match) -> str:
    """The output a leftover belongs to (a journal's temporary file belongs to the journal's output)."""
    while inner := _LEFTOVER.fullmatch(match["name"]):
        match = inner
    return match["name"]


def _stale(path: Path, tag: str, owner: bool) -> bool:
    """Whether the leftover ``path`` belongs to no write under way."""
    with _lock:
        if path in _active:
            return False
    if owner:
        return True
    if not tag.isdigit():
        return False
    pid = int(tag)
    return pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
