"""dictlearn.files: atomic writes leave the old or the new file, and a folder lock admits one process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dictlearn.files import FolderLock, LockedError, atomic_save_safetensors, atomic_write_json


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    atomic_save_safetensors(tmp_path / "w.safetensors", {"s": np.float32(3.0), "m": np.ones((2, 3), np.float32)})
    from safetensors.numpy import load_file

    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert loaded["s"].shape == () and loaded["m"].shape == (2, 3)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.json", "w.safetensors"]


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    code = ("import sys, time; from dictlearn.files import FolderLock\n"
            "with FolderLock(sys.argv[1], 'a test'):\n    print('held', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            with FolderLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path):  # the killed holder's lock died with it
        with FolderLock(tmp_path):  # re-entrant within one process
            pass
