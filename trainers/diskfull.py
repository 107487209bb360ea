"""A full disk during training becomes one sentence, not an orbax/TensorStore traceback.

Checkpoints, logs and the saved dictionary are written atomically, so what is on disk when the disk fills
is a set of complete checkpoints: rerunning the same command after freeing space resumes from the newest.
"""

from __future__ import annotations

import errno
from pathlib import Path

MARKERS = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded")


class DiskFull(RuntimeError):
    """Training stopped because the disk holding its output folder is full."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain, or TensorStore's RESOURCE_EXHAUSTED status text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(exc) for m in MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (what this run has written there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def disk_full(folder: Path, what: str, resumes_from: str) -> DiskFull:
    """The error to raise: the folder, what was written there, and that rerunning after freeing space resumes."""
    return DiskFull(f"the disk holding {folder} is full: {what} failed after {_size(folder_bytes(folder))} had been "
                    f"written under {folder}. Free some space on that disk and run the same command again: it "
                    f"resumes {resumes_from}")
