"""Kill `dictlearn train` with SIGKILL mid-run, run the same command again: it resumes from the last
checkpoint (parameters, Adam state, dead counters, loader position) and ends with exactly the parameters
of an uninterrupted run (tolerance: bitwise equal, on this CPU)."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from conftest import CLI_CONFIG, kill_once_checkpointed, planted, write_cache

pytestmark = pytest.mark.usefixtures("tiny_kind")  # the TinySAE kind from conftest, for this file's tests

TESTS = Path(__file__).resolve().parent
SCRIPT = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import conftest
conftest.register_tiny_kind()  # the test decomposer kind, in this subprocess only
from dictlearn.cli import main
sys.exit(main(sys.argv[1:]))
"""
STEPS = 120
ARGS = ["--set", f"train.n_steps={STEPS}", "--set", "train.checkpoint_every=10", "--set", "train.log_every=10"]


def _config(tmp_path: Path, name: str, cache: Path) -> tuple[Path, Path]:
    out = tmp_path / name
    config = tmp_path / f"{name}.toml"
    text = CLI_CONFIG.format(out=out, wandb="disabled").replace("[train]\n", f'[train]\ncache = "{cache}"\n')
    config.write_text(text)
    return config, out


def _command(config: Path) -> list[str]:
    return [sys.executable, "-c", SCRIPT, "train", str(config), *ARGS]


def _env(tmp_path: Path) -> dict[str, str]:
    # a persistent compilation cache shared by the two subprocesses: the rerun loads the step compiled
    # by the killed run instead of compiling it again (same executable, so the numbers cannot change)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path):
    from dictlearn.cli import main
    from dictlearn.trainers.logging import read_log

    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=2048)})
    config_a, out_a = _config(tmp_path, "straight", cache)
    config_b, out_b = _config(tmp_path, "killed", cache)

    # the interrupted run: SIGKILL as soon as step 20 is checkpointed (mid-run, maybe mid-save)
    ckdir = out_b / "decomposers" / "tiny32" / "checkpoints"
    kill_once_checkpointed(_command(config_b), ckdir, 20, env=_env(tmp_path))
    assert not (out_b / "decomposers" / "tiny32" / "params.safetensors").exists()
    steps_at_kill = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert steps_at_kill and max(steps_at_kill) < STEPS

    # the same command again resumes and finishes
    rerun = subprocess.run(_command(config_b), env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming tiny4x (test_tiny_relu), tiny32 (test_tiny_relu) at step" in rerun.stdout + rerun.stderr

    # an uninterrupted run of the same config (in this process)
    assert main(["train", str(config_a), *ARGS, "--set", f"train.checkpoint_every={STEPS}"]) == 0

    for name in ("tiny4x", "tiny32"):
        a = load_file(str(out_a / "decomposers" / name / "params.safetensors"))
        b = load_file(str(out_b / "decomposers" / name / "params.safetensors"))
        assert sorted(a) == sorted(b)
        for key in a:
            assert np.array_equal(a[key], b[key]), f"{name}.{key}: max diff {np.abs(a[key] - b[key]).max()}"
        log_a = read_log(out_a / "decomposers" / name / "train_log.jsonl")
        log_b = read_log(out_b / "decomposers" / name / "train_log.jsonl")
        assert [r["step"] for r in log_b] == list(range(10, STEPS + 1, 10))  # no gaps, no repeats after the resume
        for ra, rb in zip(log_a, log_b):
            assert {k: ra[k] for k in ("loss", "mse", "fvu", "l0", "dead_frac", "lr")} == \
                   {k: rb[k] for k in ("loss", "mse", "fvu", "l0", "dead_frac", "lr")}, ra["step"]


def test_checkpoint_round_trip_keeps_rng_keys_and_counters(tmp_path):
    """A decomposer that carries an nnx.Rngs (typed PRNG keys) and integer buffers restores exactly."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dictlearn.trainers import sharding
    from dictlearn.trainers.checkpoint import Checkpointer, common_step

    class WithRng(nnx.Module):
        def __init__(self, seed: int):
            self.w = nnx.Param(jnp.arange(6.0).reshape(2, 3) * (seed + 1))
            self.count = nnx.Variable(jnp.array(seed, jnp.int32))
            self.rngs = nnx.Rngs(seed)

    module = WithRng(1)
    module.rngs.dropout()  # advance the stream: the count must survive too
    opt = nnx.Optimizer(module, optax.adam(1e-3), wrt=nnx.Param)
    mesh = sharding.make_mesh(1, 1)
    model_state, opt_state = nnx.state(module), nnx.state(opt)
    model_state = sharding.place(model_state, sharding.tree_shardings(model_state, mesh, 3))
    ck = Checkpointer(tmp_path / "ck")
    ck.save(7, model_state, opt_state, {"dead_tokens": np.arange(3, dtype=np.int32)}, {"step": 7})
    ck.save(9, model_state, opt_state, {"dead_tokens": np.arange(3, dtype=np.int32)}, {"step": 9})
    ck.close()
    fresh = WithRng(5)
    ck = Checkpointer(tmp_path / "ck")
    assert ck.steps() == [7, 9] and common_step([ck]) == 9
    got_model, got_opt, got_trainer, meta = ck.restore(9, nnx.state(fresh), nnx.state(nnx.Optimizer(fresh, optax.adam(1e-3), wrt=nnx.Param)),
                                                       {"dead_tokens": jnp.zeros(3, jnp.int32)})
    ck.close()
    assert meta == {"step": 9}
    np.testing.assert_array_equal(got_trainer["dead_tokens"], np.arange(3))
    before, after = jax.tree.leaves(model_state), jax.tree.leaves(got_model)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key)
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    nnx.update(fresh, got_model)
    assert int(fresh.count[...]) == 1 and np.array_equal(np.asarray(fresh.w[...]), np.arange(6.0).reshape(2, 3) * 2)
