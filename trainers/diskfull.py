"""A full disk during training becomes one sentence, not an orbax/TensorStore traceback.

Checkpoints, logs and the saved dictionary are written atomically, so what is on disk when the disk fills
is a set of complete checkpoints: rerunning the same command after freeing space resumes from the newest.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from dictlearn.files import human_size

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
    total = 0
    # Checkpoint writers may still be renaming or removing their temporary folders: whatever vanishes
    # during the walk is simply not counted.
    for root, _, files in os.walk(folder, onerror=lambda e: None):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total



def disk_full(folder: Path, what: str, resumes_from: str) -> DiskFull:
    """The error to raise: the folder, what was written there, and that rerunning after freeing space resumes."""
    return DiskFull(f"the disk holding {folder} is full: {what} failed after {human_size(folder_bytes(folder))} had been "
                    f"written under {folder}. Free some space on that disk and run the same command again: it "
                    f"resumes {resumes_from}")
