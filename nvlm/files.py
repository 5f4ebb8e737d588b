"""Atomic writes and a run folder's lock.

Atomic writes: a reader (or a resumed run) sees the old file or folder, or the complete new one,
never half of either, also after a power loss: the new data is fsynced before the rename and the
rename after it (a kill alone never needed that, the page cache survives a process). Checkpoints,
the trainer's records, the synthetic data and plots use these. A kill can leave the temporary
siblings behind (`.NAME.tmp-<hex>`, `.NAME.old-<hex>`); `remove_temporaries` clears them.

`RunLock` keeps two runs out of one folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{32}$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yields a fresh temporary sibling of `path`; on success renames it to `path` (replacing an
    existing directory only then), on failure removes it and leaves `path` as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{str(path)!r} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling path to write; on success it replaces `path` in one rename, on
    failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def remove_temporaries(folder: Path) -> list[str]:
    """Remove what killed atomic writes left in `folder` (not recursive); returns their names.
    Only for a folder no other writer uses (hold its RunLock)."""
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if _TEMPORARY.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


class RunLock:
    """An exclusive hold on a run folder while a run writes into it.

    FOLDER/.lock is flock'ed for the life of the holding process and names it (pid, host, start
    time). The kernel drops the flock when the holder dies however it dies, so a lock left by a
    killed run is taken over (`stale` says whose it was); a live holder's is refused with a
    ValueError that names it. Not reentrant; one per process.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
                   if isinstance(holder, dict) else repr(holder))
            raise InputError(f"--out {self.path.parent}: another run is writing there ({who}); "
                             "wait for it to end or choose another --out") from None
        self.stale = _read_holder(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)   # empty: released cleanly (not stale)
            os.close(self.fd)          # drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any] | str:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
