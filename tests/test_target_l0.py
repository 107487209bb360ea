"""Matched sparsity: `target_l0` adapts the sparsity pressure of the penalty mechanisms (ReLU's L1 coefficient,
JumpReLU's thresholds) until the running L0 reaches the target; the controller's state is saved, loaded and
restored on resume like any other training state."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import dictlearn.decomposers as D
from dictlearn.config import ConfigError
from dictlearn.decomposers import base

from conftest import planted

TARGET = 8.0
STEPS = 500
# Settings where the fixed coefficient leaves L0 far from TARGET on this data (about 25, measured).
PENALTY = {"relu": {"l1_coefficient": 0.01},
           "jumprelu": {"l0_coefficient": 0.01, "bandwidth": 0.05, "initial_threshold": 0.05}}


def _unit_planted(rows: int = 4096) -> np.ndarray:
    """Planted 3-sparse rows at unit mean squared norm (the scale the trainer trains at)."""
    x = planted(n_rows=rows)
    return (x / np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, 1)))).astype(np.float32)


def _config(kind: str, sparsity: str | None = None, **extra) -> dict:
    mechanism = sparsity or kind
    cfg = {"d_in": 16, "n_features": 64, "hookpoint_in": "resid_post.1", **PENALTY[mechanism], **extra}
    if sparsity:
        cfg.update(sparsity=sparsity, d_out=12, hookpoint_in="mlp_in.1", hookpoint_out="mlp_out.1")
    return cfg


def _data(transcoder: bool) -> dict[str, np.ndarray]:
    x = _unit_planted()
    if not transcoder:
        return {"x": x, "y": x}
    w = np.random.default_rng(3).normal(size=(16, 12)).astype(np.float32) / 4
    return {"x": x, "y": x @ w}


@pytest.mark.parametrize("kind,sparsity", [("relu", None), ("jumprelu", None), ("transcoder", "jumprelu")])
def test_target_is_reached_and_a_fixed_coefficient_is_not(kind, sparsity, train_steps):
    data = _data(sparsity is not None)
    ends = {}
    for target in (None, TARGET):
        extra = {"target_l0": target} if target else {}
        model = D.build(kind, _config(kind, sparsity, **extra))
        metrics = train_steps(model, data, STEPS, 128, lr=2e-3)
        ends[target] = float(np.mean(metrics["l0"][-50:]))
        if target:
            assert abs(metrics["l0_ema"][-1] - TARGET) < 0.2 * TARGET  # the running L0 the controller reads
            assert metrics["sparsity_scale"][-1] != 1.0  # the controller acted
            assert metrics["fvu"][-1] < 0.5
    assert abs(ends[TARGET] - TARGET) <= 0.2 * TARGET, ends
    assert abs(ends[None] - TARGET) > 0.2 * TARGET, ends  # the fixed coefficient on its own ends elsewhere


def test_controller_state_is_saved_and_loaded(tmp_path, train_steps):
    from dictlearn.export.kinds import to_linear

    for kind in ("relu", "jumprelu"):
        model = D.build(kind, _config(kind, target_l0=4.0))
        train_steps(model, _data(False), 20, 64, lr=1e-3)
        arrays = base.state_arrays(model)
        assert {"sparsity.control.log_scale", "sparsity.control.l0_ema"} <= set(arrays)
        assert arrays["sparsity.control.log_scale"] != 0.0  # moved from its start
        base.save(model, tmp_path / kind)
        loaded = base.load(tmp_path / kind)
        assert loaded.config.target_l0 == 4.0
        for key, value in base.state_arrays(loaded).items():
            np.testing.assert_array_equal(value, arrays[key], err_msg=key)
        x = _data(False)["x"][:64]
        np.testing.assert_array_equal(np.asarray(loaded.encode(x)), np.asarray(model.encode(x)))
        # exports read the controlled thresholds (the SAELens/sparsify affine form encodes the same)
        np.testing.assert_allclose(np.asarray(to_linear(loaded).encode(x)), np.asarray(model.encode(x)), atol=1e-5)


def test_a_folder_saved_without_a_target_still_loads(tmp_path):
    """Configs written before target_l0 existed lack its keys: they load with a fixed coefficient."""
    for kind in ("relu", "jumprelu"):
        model = D.build(kind, _config(kind))
        base.save(model, tmp_path / kind)
        meta = json.loads((tmp_path / kind / base.CONFIG_FILE).read_text())
        for key in ("target_l0", "target_l0_gain"):
            meta["config"].pop(key)
        (tmp_path / kind / base.CONFIG_FILE).write_text(json.dumps(meta))
        loaded = base.load(tmp_path / kind)
        assert loaded.config.target_l0 is None and not any("log_scale" in k for k in base.state_arrays(loaded))


@pytest.mark.parametrize("kind,bad,message", [
    ("relu", {"target_l0": 0.0}, "target_l0 must be in"),
    ("relu", {"target_l0": -3.0}, "target_l0 must be in"),
    ("jumprelu", {"target_l0": 65.0}, r"target_l0 must be in \(0, n_features = 64\]"),
    ("jumprelu", {"target_l0": 8.0, "target_l0_gain": 0.0}, "target_l0_gain must be positive"),
    ("relu", {"target_l0": 8.0, "l1_coefficient": 0.0}, "l1_coefficient, so it must be positive"),
    ("transcoder", {"sparsity": "relu", "target_l0": 1000.0}, "target_l0 must be in"),
])
def test_a_bad_target_is_a_clear_error(kind, bad, message):
    cfg = _config(kind, bad.get("sparsity"), **{k: v for k, v in bad.items() if k != "sparsity"})
    with pytest.raises(ConfigError, match=message):
        D.build(kind, cfg)


def test_resume_restores_the_controller_exactly(tmp_path):
    """A run resumed from its middle checkpoint ends with the parameters, controller state and log of the
    uninterrupted run, bit for bit; the log carries the coefficient and the running L0."""
    from dictlearn.trainers.data import ArraySource
    from dictlearn.trainers.logging import WandbConfig, read_log
    from dictlearn.trainers.sgd import DecomposerSpec, TrainConfig, train

    x = _unit_planted(2048) * 30.0  # the trainer rescales to unit mean squared norm
    specs = [DecomposerSpec(name=kind, kind=kind, folder=tmp_path / kind,
                            config=D.build(kind, _config(kind, target_l0=TARGET)).config) for kind in PENALTY]
    cfg = TrainConfig(batch_size=64, n_steps=20, lr=1e-3, warmup_steps=5, log_every=5, checkpoint_every=10,
                      sample_tokens=1024, progress=False)

    def run():
        return train(specs, ArraySource({"resid_post.1": x}, batch_size=64, seed=0), cfg, WandbConfig(mode="disabled"))

    run()
    first = {k: (base.state_arrays(base.load(tmp_path / k)), read_log(tmp_path / k / "train_log.jsonl")) for k in PENALTY}
    for kind in PENALTY:  # back to the state of a run killed after its step-10 checkpoint
        shutil.rmtree(tmp_path / kind / "checkpoints" / "20")
        for name in (base.CONFIG_FILE, base.PARAMS_FILE):
            (tmp_path / kind / name).unlink()
    run()
    for kind in PENALTY:
        arrays, log = first[kind]
        again = base.state_arrays(base.load(tmp_path / kind))
        assert sorted(again) == sorted(arrays)
        for key in arrays:
            np.testing.assert_array_equal(again[key], arrays[key], err_msg=f"{kind}.{key}")
        timeless = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]
        assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_log(tmp_path / kind / "train_log.jsonl")] == timeless
        assert {"l0_ema", "sparsity_scale"} <= set(log[-1])
    assert "l1_coefficient" in first["relu"][1][-1] and "l0_coefficient" in first["jumprelu"][1][-1]
