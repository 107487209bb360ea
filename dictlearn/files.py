"""Writing files so that a kill or a second process never leaves anything half-written or mixed.

Every file dictlearn writes goes through `atomic_write_*`: the bytes land in a temporary file beside the
target, are fsynced, renamed over the target, and the folder entry is fsynced, so a reader (or a resumed
run) sees the old file or the new one, never half of one. `FolderLock` gives one process at a time an
output folder (a harvest's cache, a run's decomposers); the lock is an fcntl lock, so the kernel releases
it when its holder dies and a stale lock file never blocks a later run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LOCK_FILE = ".dictlearn.lock"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Replace `path` with `payload` atomically and durably (temp file, fsync, rename, fsync the folder)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    return atomic_write_bytes(path, json.dumps(data, indent=indent).encode())


def atomic_save_safetensors(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """safetensors.numpy.save, atomically (0-d arrays keep their shape)."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}
    return atomic_write_bytes(path, save(arrays, metadata=metadata))


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def human_size(n: float) -> str:
    """A byte count for people: MB below a gigabyte (a 4.6 MB cache is not "0.00 GB")."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.1f} MB"


class LockedError(RuntimeError):
    """Another live process holds the folder."""


class FolderLock:
    """Exclusive use of `folder` by this process (a context manager; re-entrant within one process).

    A second process that asks for the same folder gets LockedError naming the holder's pid, host and
    command instead of silently sharing the folder. The lock dies with its holder (fcntl), so a run killed
    with SIGKILL leaves nothing that blocks the next one."""

    _held: dict[str, int] = {}  # resolved folder -> depth, for re-entry within one process

    def __init__(self, folder: str | Path, what: str = "this folder"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.folder.resolve())
        if FolderLock._held.get(key):
            FolderLock._held[key] += 1
            return self
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(f"{self.folder} is in use by another dictlearn process ({_holder(path)}); wait for "
                              f"it to finish or stop it, then run this command again") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join(sys.argv)[:500], "what": self.what}).encode())
        os.fsync(fd)
        self._fd = fd
        FolderLock._held[key] = 1
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.folder.resolve())
        FolderLock._held[key] -= 1
        if FolderLock._held[key] == 0:
            del FolderLock._held[key]
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, running {info.get('command') or '?'!r}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
