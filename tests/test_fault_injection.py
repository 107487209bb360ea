"""The fault-injection script (issue 14): SIGKILL `dictlearn harvest` and `dictlearn train` at random moments,
rerun to completion, and find nothing lost, duplicated or changed (slow: several model loads and jit warm-ups)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_harvest_and_training_resume_to_the_uninterrupted_results(tmp_path, assets):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fault_injection.py"), "--kills", "2", "--n-tokens", "4096",
                           "--steps", "60", "--seed", "3", "--work", str(tmp_path / "work"), "--json", str(report)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert [e["stage"] for e in r["kills"]] == ["harvest", "train"]
    c = r["cache"]
    assert c["rows_resumed"] == c["rows_reference"] > 0
    assert c["rows_lost"] == c["rows_duplicated"] == c["rows_extra"] == c["rows_changed"] == c["shards_differing"] == 0
    assert r["train"]["max_param_diff"] == 0.0 and r["train"]["n_values"] > 0
    assert "lost 0, duplicated 0" in proc.stdout
