"""A new kind is one new file: dropped into dictlearn/decomposers/, it trains, resumes, evaluates and exports
(a SAELens folder) through the CLI, and the registry-driven tests collect it, with no other edit.

The kind's source is kept below; the test writes it to dictlearn/decomposers/zz_test_kind_<random>.py (ignored
by git), runs `dictlearn run` in a subprocess on the real SmolLM2 with a small harvest, kills the first run after
its first checkpoint, runs again (the cache is reused, training resumes, eval and export run), and removes
the file whatever happens."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS, ROOT, SMOL_GGUF

KIND_SOURCE = '''"""A test kind: TopK with 4 latents per token by default and a tiny example (written by tests/test_new_kind.py)."""

import dataclasses
from typing import ClassVar

from dictlearn.decomposers.base import register
from dictlearn.decomposers.topk import TopKConfig, TopKSAE


@dataclasses.dataclass
class FewTopKConfig(TopKConfig):
    k: int = 4  # fewer active latents than TopK's default


@register
class FewTopK(TopKSAE):
    kind: ClassVar[str] = "{kind}"
    config_cls: ClassVar[type] = FewTopKConfig
    example: ClassVar[dict] = {{"hookpoint_in": "resid_post", "expansion": 2}}
'''

CONFIG = """
out_dir = "{out}"
[model]
name = "{model}"
dtype = "float32"
[corpus]
path = "{corpus}"
context_length = 64
[harvest]
hookpoints = ["resid_post.2"]
n_tokens = 2048
dtype = "float32"
shard_mb = 0.6
eval_fraction = 0.25
[train]
batch_size = 128
n_steps = 200
lr = 1e-3
warmup_steps = 10
log_every = 50
checkpoint_every = 20
sample_tokens = 512
progress = false
[[decomposers]]
name = "fresh"
kind = "{kind}"
hookpoint_in = "resid_post.2"
expansion = 2
[eval]
n_eval_rows = 256
batch_size = 256
n_downstream_sequences = 1
downstream_batch_size = 1
n_feature_cards = 1
torch_threads = 1
[export]
[wandb]
mode = "disabled"
"""


def _cli(config: Path, *args: str) -> list[str]:
    """`dictlearn run CONFIG ARGS...` in a fresh interpreter (what the console script runs)."""
    return [sys.executable, "-c", "import sys; from dictlearn.cli import main; sys.exit(main())", "run", str(config), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _checkpoint_steps(folder: Path) -> list[int]:
    ckpt = folder / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


@pytest.fixture
def new_kind_file():
    """The kind's name, while its file sits in dictlearn/decomposers/ (removed afterwards, even on failure)."""
    kind = f"zz_test_kind_{secrets.token_hex(4)}"
    path = ROOT / "dictlearn" / "decomposers" / f"{kind}.py"
    for stale in path.parent.glob("zz_test_kind_*.py"):  # left by a killed test run more than an hour ago
        if time.time() - stale.stat().st_mtime > 3600:
            stale.unlink(missing_ok=True)
    path.write_text(KIND_SOURCE.format(kind=kind))
    try:
        yield kind
    finally:
        path.unlink(missing_ok=True)


def test_a_new_kind_in_one_file_trains_resumes_evaluates_and_exports(new_kind_file, tmp_path, assets):
    kind = new_kind_file
    out = tmp_path / "run"
    config = tmp_path / "new_kind.toml"
    config.write_text(CONFIG.format(out=out, model=SMOL_GGUF, corpus=CORPUS, kind=kind))
    folder = out / "decomposers" / "fresh"

    # 1. Harvest and start training; kill the process once a checkpoint is on disk.
    first = subprocess.Popen(_cli(config, "--stages", "harvest", "train"), cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while first.poll() is None and not _checkpoint_steps(folder) and time.time() < deadline:
        time.sleep(0.05)
    killed = first.poll() is None
    if killed:
        os.killpg(first.pid, signal.SIGKILL)
    log = first.communicate()[0]
    assert killed, f"the first run ended before it could be interrupted (exit {first.returncode}):\n{log[-3000:]}"
    assert _checkpoint_steps(folder) and not (folder / "config.json").exists(), log[-3000:]

    # 2. The same command with every stage: the cache is reused, training resumes, eval and export run.
    second = subprocess.run(_cli(config), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "resuming" in log and "at step" in log, log[-4000:]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["kind"] == kind and saved["config"]["k"] == 4 and saved["extra"]["trained_steps"] == 200
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    (record,) = [r for r in metrics["decomposers"] if r["name"] == "fresh"]
    assert record["kind"] == kind and 0 < record["fvu"] < 1 and record["l0"] == pytest.approx(4, abs=0.01)
    export = out / "export" / "fresh"
    summary = json.loads((export / "export.json").read_text())
    assert "cfg.json" in summary["files"] and not summary["skipped"], summary
    cfg = json.loads((export / "cfg.json").read_text())
    assert cfg["d_in"] == 576 and cfg["d_sae"] == 1152 and (export / "sae_weights.safetensors").is_file()

    # 3. The registry-driven tests collect the new kind with no edit to them.
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_every_kind.py",
                                "tests/test_decomposers.py"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                               timeout=300)
    for test in ("test_every_kind.py::test_trains_from_its_example", "test_every_kind.py::test_export_round_trip",
                 "test_decomposers.py::test_trains_saves_loads_and_folds"):
        assert f"{test}[{kind}" in collected.stdout, collected.stdout[-3000:] + collected.stderr[-2000:]
