"""Reliability of resuming from checkpoints: a damaged latest checkpoint is skipped (and said), a refused
resume names only the settings that differ, and a different activation cache is refused by name."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from dictlearn.trainers.checkpoint import (
    CACHE_KEY, CheckpointMismatch, Checkpointer, check_signature, restore_newest, signature_differences,
)
from conftest import CLI_CONFIG, planted, write_cache

pytestmark = pytest.mark.usefixtures("tiny_kind")  # the TinySAE kind from conftest, for this file's tests

STEPS = 40
ARGS = ["--set", f"train.n_steps={STEPS}", "--set", "train.checkpoint_every=10", "--set", "train.log_every=10"]


def _config(tmp_path: Path, name: str, cache: Path) -> tuple[Path, Path]:
    out = tmp_path / name
    config = tmp_path / f"{name}.toml"
    config.write_text(CLI_CONFIG.format(out=out, wandb="disabled").replace("[train]\n", f'[train]\ncache = "{cache}"\n'))
    return config, out


def _truncate_step(folder: Path) -> None:
    """Cut every file of a checkpoint step to half its size, as a full disk or a dying machine leaves it."""
    for root, _, files in os.walk(folder):
        for f in files:
            path = Path(root) / f
            os.truncate(path, path.stat().st_size // 2)


def test_truncated_latest_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    from dictlearn.cli import main
    from dictlearn.trainers.logging import read_log

    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=2048)})
    config_a, out_a = _config(tmp_path, "straight", cache)
    config_b, out_b = _config(tmp_path, "damaged", cache)
    assert main(["train", str(config_a), *ARGS]) == 0
    assert main(["train", str(config_b), *ARGS]) == 0
    capsys.readouterr()

    # run B as if killed after its last checkpoint (step 40) and before the final save, whose files then
    # got damaged for one decomposer: the pass must go back to step 30 for both
    for name in ("tiny4x", "tiny32"):
        for f in ("params.safetensors", "config.json"):
            (out_b / "decomposers" / name / f).unlink()
    ck = out_b / "decomposers" / "tiny32" / "checkpoints"
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [30, 40]
    _truncate_step(ck / "40")

    assert main(["train", str(config_b), *ARGS]) == 0
    said = capsys.readouterr()
    text = said.out + said.err
    assert f"skipping checkpoint step 40 in {ck}: it does not restore" in text, text
    assert "resuming from checkpoint step 30, the newest that restores" in text, text
    assert "at step 30 of 40" in text, text
    assert "Traceback" not in text

    for name in ("tiny4x", "tiny32"):
        a, b = (load_file(str(out / "decomposers" / name / "params.safetensors")) for out in (out_a, out_b))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name  # bit for bit
        assert [r["step"] for r in read_log(out_b / "decomposers" / name / "train_log.jsonl")] == [10, 20, 30, 40]
    # the damaged step was replaced by a good one: it restores now
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [30, 40]


class _Tiny(nnx.Module):
    def __init__(self, scale: float):
        self.w = nnx.Param(jnp.arange(12.0).reshape(3, 4) * scale)


def _templates(scale: float):
    module = _Tiny(scale)
    opt = nnx.Optimizer(module, optax.adam(1e-3), wrt=nnx.Param)
    return nnx.state(module), nnx.state(opt), {"dead_tokens": np.zeros(4, np.int32)}


def _saved(folder: Path, steps: list[int], signature: dict) -> Checkpointer:
    ck = Checkpointer(folder, keep=len(steps))
    for step in steps:
        model, opt, trainer = _templates(float(step))
        ck.save(step, model, opt, trainer, {"step": step, "signature": signature})
    ck.close()
    return Checkpointer(folder, keep=len(steps))


def test_restore_newest_skips_unreadable_steps_and_refuses_when_none_restores(tmp_path):
    sig = {"kind": "relu", "config": {"k": 8}, CACHE_KEY: "abc"}
    ck = _saved(tmp_path / "ck", [10, 20, 30], sig)
    _truncate_step(tmp_path / "ck" / "30")
    said: list[str] = []
    got = restore_newest([ck], [_templates(0.0)], [sig], say=said.append)
    assert got is not None and got.step == 20 and got.metas[0]["step"] == 20
    np.testing.assert_array_equal(np.asarray(got.states[0][0]["w"][...]), np.arange(12.0).reshape(3, 4) * 20)
    assert said[0].startswith(f"skipping checkpoint step 30 in {ck.folder}: it does not restore (")
    assert ck.steps() == [10, 20]  # the unreadable step is gone, so the resumed run can write it again

    for step in (10, 20):
        _truncate_step(tmp_path / "ck" / str(step))
    ck.close()
    ck = Checkpointer(tmp_path / "ck", keep=3)
    with pytest.raises(CheckpointMismatch, match=r"no checkpoint step restores \(steps 10, 20; the newest, in"):
        restore_newest([ck], [_templates(0.0)], [sig], say=said.append)
    assert ck.steps() == [10, 20]  # nothing deleted when nothing restores
    ck.close()


def test_restore_newest_refuses_other_settings_instead_of_skipping(tmp_path):
    ck = _saved(tmp_path / "ck", [10], {"kind": "relu", "config": {"k": 8, "d_in": 16}, CACHE_KEY: "abc"})
    with pytest.raises(CheckpointMismatch, match=r"config\.k: saved 8, now 16\)") as e:
        restore_newest([ck], [_templates(0.0)], [{"kind": "relu", "config": {"k": 16, "d_in": 16}, CACHE_KEY: "abc"}])
    assert "d_in" not in str(e.value) and "kind" not in str(e.value)
    assert ck.steps() == [10]
    ck.close()
    empty = Checkpointer(tmp_path / "none")
    assert restore_newest([empty], [_templates(0.0)], [{}]) is None
    with pytest.raises(CheckpointMismatch, match="cannot resume together"):
        restore_newest([Checkpointer(tmp_path / "ck"), empty], [_templates(0.0)] * 2, [{}, {}])


def test_refused_resume_names_only_the_differing_keys(tmp_path):
    config = {f"field{i}": i for i in range(30)}
    saved = {"kind": "topk", "config": {**config, "k": 8}, "lr": 1e-3, CACHE_KEY: "aaa"}
    now = {"kind": "topk", "config": {**config, "k": 16, "new_field": True}, "lr": 1e-3, CACHE_KEY: "aaa"}
    assert signature_differences(saved, now) == ["config.k: saved 8, now 16", "config.new_field: saved (not recorded), now True"]
    with pytest.raises(CheckpointMismatch) as e:
        check_signature(tmp_path, saved, now)
    msg = str(e.value)
    assert "config.k: saved 8, now 16" in msg and "field7" not in msg and "lr" not in msg
    assert "cache" not in msg  # the cache is the same
    check_signature(tmp_path, saved, dict(saved))  # equal: no error


def test_resume_on_another_cache_is_refused_by_name(tmp_path):
    saved = {"kind": "topk", "config": {"k": 8}, CACHE_KEY: "f" * 64}
    with pytest.raises(CheckpointMismatch) as e:
        check_signature(tmp_path, saved, {**saved, CACHE_KEY: "0" * 64})
    msg = str(e.value)
    assert f"{CACHE_KEY}: saved 'fff" in msg and "now '000" in msg
    assert "not the one these checkpoints were trained on" in msg and "point train.cache back" in msg
