"""The run object and its stages: one up-to-date rule, one trainer protocol, and the reliability faults of
issue 14 injected the way users meet them (a swapped cache, a flipped byte, an overflowing row, two
concurrent trainings, a full disk, a garbage params file, an export carried to another machine)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI_CONFIG, TinySAE, planted, spec, train_cfg, write_cache

pytestmark = pytest.mark.usefixtures("tiny_kind")  # the TinySAE kind from conftest, for this file's tests
from dictlearn.decomposers import base

TESTS = Path(__file__).resolve().parent
EVAL_ONLY_RECON = "[eval]\nn_eval_rows = 256\nbatch_size = 64\nn_downstream_sequences = 0\nn_feature_cards = 0\n"


def _config(tmp_path: Path, name: str, cache: Path, extra: str = "") -> tuple[Path, Path]:
    out = tmp_path / name
    config = tmp_path / f"{name}.toml"
    text = CLI_CONFIG.format(out=out, wandb="disabled").replace("[train]\n", f'[train]\ncache = "{cache}"\n')
    config.write_text(text + extra)
    return config, out


def _main(*argv: str) -> int:
    from dictlearn.cli import main

    return main(list(argv))


# --- the one up-to-date rule ---------------------------------------------------------------------------------------
def test_stamp_tracks_inputs_options_and_outputs(tmp_path):
    from dictlearn.run import mark_done, stale_reasons, up_to_date

    src, out = tmp_path / "in.bin", tmp_path / "out"
    src.write_bytes(b"abc")
    out.mkdir()
    (out / "result.json").write_text("{}")
    inputs, options = {"src": src, "cache": "id-1"}, {"k": 1}
    assert stale_reasons(out, inputs, options) == ["never finished"]
    mark_done(out, inputs, options, ["result.json"])
    assert up_to_date(out, inputs, options)
    assert stale_reasons(out, inputs, {"k": 2}) == ["k: was 1, now 2"]
    assert stale_reasons(out, {**inputs, "cache": "id-2"}, options) == ["input cache changed"]
    src.write_bytes(b"abd")  # same size, other content: the rule reads content, not size or time
    assert stale_reasons(out, inputs, options) == ["input src changed"]
    src.write_bytes(b"abc")
    (out / "result.json").write_text("{ }")
    assert any("changed or damaged" in r for r in stale_reasons(out, inputs, options))


def test_run_layout_and_one_cache_rule(tmp_path):
    from dictlearn.config import ConfigError
    from dictlearn.run import Run

    config = tmp_path / "r.toml"
    config.write_text(f'out_dir = "{tmp_path / "o"}"\n')
    run = Run.from_config(config)
    assert run.cache_dir == tmp_path / "o" / "cache" and run.decomposer_dir("a") == tmp_path / "o" / "decomposers" / "a"
    assert run.eval_dir == tmp_path / "o" / "eval" and run.export_dir("a") == tmp_path / "o" / "export" / "a"
    assert Run.from_config(config, ["train.cache=/data/c"]).cache_dir == Path("/data/c")
    with pytest.raises(ConfigError, match="eval.cache is gone.*train.cache"):
        Run.from_config(config, ["eval.cache=/data/c"])


# --- one trainer protocol ------------------------------------------------------------------------------------------
def test_train_groups_specs_by_the_kinds_trainer(tmp_path):
    from dictlearn.decomposers.snmf import SNMFConfig
    from dictlearn.trainers import train
    from dictlearn.trainers.data import ArraySource
    from dictlearn.trainers.snmf import SNMFOptions
    from dictlearn.trainers.spec import DecomposerSpec
    from dictlearn.trainers.logging import WandbConfig

    x = planted(n_rows=1024)
    nmf = DecomposerSpec("nmf", "snmf", SNMFConfig(d_in=16, n_features=4, hookpoint_in="act"), tmp_path / "d" / "nmf",
                         options=SNMFOptions(max_iters=5, max_rows=512, batch_size=128, progress=False))
    result = train([spec(tmp_path), nmf], ArraySource({"act": x}, 64, 0), train_cfg(n_steps=20, log_every=10),
                   WandbConfig(mode="disabled"))
    assert set(result.decomposers) == {"tiny", "nmf"}
    assert result.decomposers["nmf"].kind == "snmf" and result.decomposers["tiny"].kind == TinySAE.kind
    assert [r["step"] for r in result.logs["tiny"]] == [10, 20] and result.logs["nmf"]
    assert base.load(result.folders["nmf"]).config.n_features == 4


# --- issue 14, item 2: a resumed training on another cache -----------------------------------------------------------
def test_resume_on_another_cache_is_refused_naming_both(tmp_path, capsys):
    cache_a = write_cache(tmp_path / "cache_a", {"act": planted(n_rows=2048, seed=0)})
    cache_b = write_cache(tmp_path / "cache_b", {"act": planted(n_rows=2048, seed=1)})
    config, out = _config(tmp_path, "swap", cache_a)
    assert _main("train", str(config), "--set", "train.n_steps=20", "--set", "train.checkpoint_every=10",
                 "--only", "tiny32") == 0
    folder = out / "decomposers" / "tiny32"
    for f in ("params.safetensors", "config.json", "stamp.json"):  # as if killed after the last checkpoint
        (folder / f).unlink()
    capsys.readouterr()
    assert _main("train", str(config), "--set", "train.n_steps=20", "--set", "train.checkpoint_every=10",
                 "--only", "tiny32", "--set", f'train.cache="{cache_b}"') == 1
    err = capsys.readouterr().err
    assert "would mix two data sets" in err and str(cache_a) in err and str(cache_b) in err, err
    assert not (folder / "params.safetensors").exists()


# --- issue 14, item 3: eval verifies what it reads ------------------------------------------------------------------
def _saved_tiny(root: Path) -> None:
    cfg = TinySAE.config_cls(d_in=16, n_features=32, hookpoint_in="act")
    base.save(base.build(TinySAE.kind, cfg), root / "decomposers" / "tiny")


def test_eval_refuses_a_byte_flipped_shard_naming_it(tmp_path, capsys):
    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=1024)})
    config, out = _config(tmp_path, "flip", cache, EVAL_ONLY_RECON)
    _saved_tiny(out)
    assert _main("eval", str(config)) == 0
    shard = cache / "shard-00003.safetensors"  # the held-out shard
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10  # one bit of one activation: sizes and headers still agree
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert _main("eval", str(config), "--force") == 1
    err = capsys.readouterr().err
    assert "shard-00003.safetensors" in err and "sha256" in err, err


def test_non_finite_metric_is_an_error_naming_decomposer_and_shard(tmp_path, capsys):
    x = planted(n_rows=1024)
    x[-3, 0] = 3e38  # finite in float32, but its square is not
    cache = write_cache(tmp_path / "cache", {"act": x})
    config, out = _config(tmp_path, "inf", cache, EVAL_ONLY_RECON.replace("256", "1024"))
    _saved_tiny(out)
    assert _main("eval", str(config)) == 1
    err = capsys.readouterr().err
    assert "decomposer 'tiny'" in err and "not finite" in err and "shard-00003.safetensors" in err, err
    assert not (out / "eval" / "metrics.json").exists()


# --- issue 14, item 4: two trainings into one folder ----------------------------------------------------------------
def test_a_second_concurrent_train_is_refused_naming_the_pid(tmp_path, capsys):
    from dictlearn.files import LOCK_FILE
    from dictlearn.trainers.logging import read_log

    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=2048)})
    config, out = _config(tmp_path, "two", cache)
    args = ["--set", "train.n_steps=400", "--set", "train.log_every=20", "--set", "train.checkpoint_every=100"]
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import conftest; conftest.register_tiny_kind(); "
              "from dictlearn.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}
    first = subprocess.Popen([sys.executable, "-c", script, "train", str(config), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = out / "decomposers" / LOCK_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        try:
            if json.loads(lock.read_text()).get("pid") == first.pid:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[0][-3000:]
    assert _main("train", str(config), *args) == 1
    err = capsys.readouterr().err
    assert f"pid {first.pid}" in err and "in use by another dictlearn process" in err, err
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    for name in ("tiny4x", "tiny32"):  # the first run's log is whole: no lost or repeated lines
        assert [r["step"] for r in read_log(out / "decomposers" / name / "train_log.jsonl")] == list(range(20, 401, 20))


# --- issue 14, item 5: the disk fills during training ---------------------------------------------------------------
def test_disk_full_during_training_is_one_sentence_and_rerun_resumes(tmp_path, capsys, monkeypatch):
    from dictlearn.trainers.checkpoint import Checkpointer

    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=2048)})
    config, out = _config(tmp_path, "full", cache)
    args = ["--set", "train.n_steps=40", "--set", "train.checkpoint_every=10", "--set", "train.log_every=10"]
    real_save, calls = Checkpointer.save, []

    def save(self, step, *a, **k):
        calls.append(step)
        if step >= 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.folder))
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(Checkpointer, "save", save)
    assert _main("train", str(config), *args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert f"the disk holding {out / 'decomposers'} is full" in err and "MB had been written" in err
    assert "run the same command again: it resumes from the checkpoint at step 10" in err, err
    monkeypatch.setattr(Checkpointer, "save", real_save)
    assert _main("train", str(config), *args) == 0
    assert "resuming tiny4x (test_tiny_relu), tiny32 (test_tiny_relu) at step 10" in capsys.readouterr().out


def test_resource_exhausted_counts_as_a_full_disk():
    from dictlearn.trainers.diskfull import is_disk_full

    try:
        try:
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")
        except ValueError as inner:
            raise RuntimeError("checkpoint save failed") from inner
    except RuntimeError as e:
        assert is_disk_full(e)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


# --- issue 14, item 9: a garbage params.safetensors -----------------------------------------------------------------
def test_garbage_params_are_named_by_train_eval_and_export(tmp_path, capsys):
    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=1024)})
    config, out = _config(tmp_path, "garbage", cache, EVAL_ONLY_RECON)
    short = ["--set", "train.n_steps=10", "--set", "train.checkpoint_every=10", "--only", "tiny32"]
    assert _main("train", str(config), *short) == 0
    params = out / "decomposers" / "tiny32" / "params.safetensors"
    params.write_bytes(b"\xff" * 64)
    capsys.readouterr()
    assert _main("train", str(config), *short) == 1
    captured = capsys.readouterr()
    assert "already trained" not in captured.out and str(params) in captured.err and "delete" in captured.err
    for command in ("eval", "export"):
        assert _main(command, str(config), "--only", "tiny32") == 1
        err = capsys.readouterr().err
        assert "params.safetensors" in err and "Traceback" not in err, (command, err)


# --- issue 14, item 11: exports carry the user's name for the model ---------------------------------------------------
def test_export_records_the_model_as_given_and_its_fingerprint(tmp_path, monkeypatch):
    from dictlearn.activations.cache import ActivationCache
    from dictlearn.export.features import read_features

    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=1024)})
    config, out = _config(tmp_path, "ex", cache, '[model]\nname = "models/local.gguf"\n')
    _saved_tiny(out)
    monkeypatch.chdir(tmp_path)
    assert _main("export", str(config)) == 0
    fingerprint = ActivationCache.open(cache).manifest["model"]["fingerprint"]
    summary = json.loads((out / "export" / "tiny" / "export.json").read_text())
    assert (summary["model"], summary["model_fingerprint"]) == ("models/local.gguf", fingerprint)
    features = read_features(out / "export" / "tiny")
    assert (features.model, features.model_fingerprint) == ("models/local.gguf", fingerprint)


# --- `dictlearn run`: the same stages on one Run, every --set applied ------------------------------------------------
def test_dictlearn_run_applies_every_override_to_every_stage(tmp_path, capsys):
    from dictlearn.trainers.logging import read_log

    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=1024)})
    config, out = _config(tmp_path, "all", cache, EVAL_ONLY_RECON)
    assert _main("run", str(config), "--stages", "train", "eval", "export", "--set", "train.n_steps=20",
                 "--set", "train.log_every=10", "--set", "eval.n_eval_rows=128") == 0
    assert [r["step"] for r in read_log(out / "decomposers" / "tiny32" / "train_log.jsonl")] == [10, 20]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {r["name"]: r["n_tokens"] for r in metrics["decomposers"]} == {"tiny4x": 128, "tiny32": 128}
    assert (out / "export" / "tiny32" / "features.safetensors").is_file()
    capsys.readouterr()
    assert _main("run", str(config), "--stages", "train", "eval", "export", "--set", "train.n_steps=20",
                 "--set", "train.log_every=10", "--set", "eval.n_eval_rows=128") == 0
    printed = capsys.readouterr().out  # nothing left to do: every stage says so
    assert "tiny32: already trained" in printed and "reusing the results of tiny32, tiny4x" in printed
    assert "export: tiny32: up to date" in printed
