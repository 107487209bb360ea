"""bench/device_check.py runs on CPU (--small) and prints its one table: every row and column, finite positive
numbers, and a missing sparsify reported as "not installed" instead of a traceback."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.py"
COLUMNS = ["row", "size", "ms", "tokens/s", "x sparsify", "detail"]
STEP_ROWS = ["dictlearn fp32", "dictlearn bf16-matmul", "sparsify"]
E2E_ROWS = ["e2e harvest", "e2e train", "e2e eval"]


def run_check(*args: str, pythonpath: str = "", timeout: int = 600) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"device_check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def parse_table(out: str) -> dict[str, dict[str, str]]:
    """{row name: {column: cell}} from the markdown table printed last."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS, header
    assert set(lines[1].replace("|", "")) <= {"-"}
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS), line
        rows[cells[0]] = dict(zip(COLUMNS, cells))
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_device_check_small_prints_the_table_with_finite_figures():
    out = run_check()
    rows = parse_table(out)
    assert list(rows) == STEP_ROWS + E2E_ROWS
    for name, row in rows.items():
        for col in ("ms", "tokens/s"):
            v = number(row[col])
            assert math.isfinite(v) and v > 0, (name, col, row[col])
    for name in STEP_ROWS:
        ratio = number(rows[name]["x sparsify"])
        assert math.isfinite(ratio) and ratio > 0, name
        assert rows[name]["size"] == "64x512 b512 k8"
    assert number(rows["sparsify"]["x sparsify"]) == 1.0
    # The bf16 variant really multiplies in bfloat16: its pre-activations differ from fp32's, by little.
    err = float(rows["dictlearn bf16-matmul"]["detail"].split("pre-activation error ")[1].split()[0])
    assert 1e-5 < err < 3e-2, err
    assert "FVU" in rows["e2e eval"]["detail"] and "CE score" in rows["e2e eval"]["detail"]
    fvu = float(rows["e2e eval"]["detail"].split("FVU ")[1].split(",")[0])
    assert 0 <= fvu < 1  # the trained SAE explains some of the variance
    # The header names the devices and versions.
    assert "JAX " in out and "cpu" in out and "torch " in out and "sparsify " in out


def test_a_missing_sparsify_is_reported_not_a_traceback(tmp_path):
    hidden = tmp_path / "sparsify"
    hidden.mkdir()
    (hidden / "__init__.py").write_text('raise ImportError("No module named \'sparsify\' (hidden by the test)")\n')
    out = run_check("--parts", "step", "--rounds", "1", "--steps", "1", "--warmup", "1", pythonpath=str(tmp_path))
    rows = parse_table(out)
    assert list(rows) == STEP_ROWS
    assert rows["sparsify"]["ms"] == "not installed" and rows["sparsify"]["tokens/s"] == "not installed"
    for name in STEP_ROWS[:2]:
        assert number(rows[name]["ms"]) > 0 and rows[name]["x sparsify"] == "-"
    assert "sparsify: not installed" in out
