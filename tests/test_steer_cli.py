"""`dictlearn steer`: side-by-side output, calibrated strength, and errors that name both sides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dictlearn.cli import steer as steer_cli
from dictlearn.cli.steer import SteerArgs, SteerResult, main, side_by_side, steer_prompt
from dictlearn.export.features import write_features
from dictlearn.steering.steer import SteeringError

from conftest import SMOL_GGUF


def _features(folder: Path, hookpoint="resid_post.6", width=576, n=4, model=str(SMOL_GGUF)) -> Path:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, width)).astype(np.float32)
    return write_features(folder, v / np.linalg.norm(v, axis=1, keepdims=True), hookpoint, model=model)


def test_prints_both_continuations_side_by_side(tmp_path, capsys):
    folder = _features(tmp_path / "f")
    code = main(["--features", str(folder), "--feature", "2", "--alpha", "60", "--prompt", "The weather today",
                 "--max-new-tokens", "3", "--width", "40"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("unsteered"))
    assert "| steered (feature 2)" in header
    assert "feature 2 at resid_post.6: alpha 60 x vector (norm 1)" in out
    body = lines[lines.index(header) + 2:]
    assert body and all(len(line.split(" | ")[0]) <= 40 for line in body if " | " in line)
    assert body[0].startswith("The weather today")


def test_feature_out_of_range_names_index_and_count(tmp_path, capsys):
    folder = _features(tmp_path / "f")
    assert main(["--features", str(folder), "--feature", "4", "--alpha", "1", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "feature 4 is out of range" in err and "holds 4 features (indices 0..3)" in err and str(folder) in err


def test_hookpoint_the_model_lacks(tmp_path, smol):
    folder = _features(tmp_path / "f", hookpoint="resid_post.40")
    with pytest.raises(SteeringError, match=r"hookpoint 'resid_post\.40' does not exist in the model LlamaForCausalLM.*0\.\.29"):
        steer_prompt(SteerArgs(features=folder, feature=0, prompt="x", alpha=1.0), loaded=smol)


def test_width_mismatch_names_both_widths(tmp_path, smol):
    folder = _features(tmp_path / "f", width=768)
    with pytest.raises(SteeringError, match=rf"features in {folder}.*width 768, but hookpoint resid_post\.6 of the model .*width 576"):
        steer_prompt(SteerArgs(features=folder, feature=0, prompt="x", alpha=1.0), loaded=smol)


def test_argument_errors(tmp_path, capsys):
    folder = _features(tmp_path / "f", model=None)
    assert main(["--features", str(folder), "--feature", "0", "--alpha", "1", "--kl", "0.5", "--prompt", "x"]) == 1
    assert "exactly one of --alpha" in capsys.readouterr().err
    assert main(["--features", str(folder), "--feature", "0", "--alpha", "1", "--prompt", "x"]) == 1
    assert "names no model; pass --model" in capsys.readouterr().err
    assert main(["--features", str(tmp_path / "nothing"), "--feature", "0", "--alpha", "1", "--prompt", "x"]) == 1
    assert "features.safetensors is missing" in capsys.readouterr().err
    assert main(["--features", str(folder), "--feature", "0", "--kl", "0.5", "--max-forwards", "0", "--prompt", "x"]) == 1
    assert "--max-forwards must be at least 1" in capsys.readouterr().err


def test_kl_calibrates_alpha(tmp_path, smol):
    folder = _features(tmp_path / "f")
    res = steer_prompt(SteerArgs(features=folder, feature=1, prompt="I went to the shop", kl=0.5, sign=-1,
                                 max_new_tokens=1), loaded=smol)
    cal = res.calibration
    assert cal.converged and abs(cal.kl - 0.5) <= 0.1 * 0.5
    assert res.alpha == pytest.approx(cal.alpha / res.vector_norm) and res.alpha < 0  # sign -1: against the feature
    assert res.warnings == []


def test_kl_warns_when_calibration_does_not_converge(tmp_path, smol):
    folder = _features(tmp_path / "f")
    res = steer_prompt(SteerArgs(features=folder, feature=1, prompt="I went to the shop", kl=0.5, max_forwards=1,
                                 max_new_tokens=1), loaded=smol)
    assert not res.calibration.converged and res.calibration.n_forwards == 1
    assert len(res.warnings) == 1
    assert "did not converge" in res.warnings[0] and "target 0.5" in res.warnings[0] and "--max-forwards" in res.warnings[0]


def test_main_prints_warnings_to_stderr(tmp_path, capsys, monkeypatch):
    result = SteerResult(" a", " b", 1.0, "resid_post.6", 1.0, warnings=["the KL calibration did not converge: ..."])
    monkeypatch.setattr(steer_cli, "steer_prompt", lambda args: result)
    assert main(["--features", str(tmp_path), "--feature", "0", "--kl", "0.5", "--prompt", "x"]) == 0
    captured = capsys.readouterr()
    assert "dictlearn steer: warning: the KL calibration did not converge" in captured.err
    assert "did not converge" not in captured.out


def test_side_by_side_layout():
    text = side_by_side("left", "a " * 30, "right", "b", width=12)
    lines = text.splitlines()
    assert lines[0] == "left         | right" and lines[1].startswith("----")
    assert all(len(line.split(" | ")[0]) == 12 for line in lines if " | " in line)
    assert len(lines) == 2 + 5  # 30 two-character words wrap into 5 lines of 12
