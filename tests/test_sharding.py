"""The train step under a ("data", "model") mesh: on 4 simulated CPU devices, and as 2 JAX processes
joined by jax.distributed (gloo), the trained parameters equal those of one device within float32
reduction-order noise: asserted rtol 1e-4 / atol 1e-6 after 40 Adam steps; the measured largest
difference is about 1e-7 of each array's largest entry."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.usefixtures("tiny_kind")  # the TinySAE kind from conftest, for this file's tests

TESTS = Path(__file__).resolve().parent
RTOL, ATOL = 1e-4, 1e-6

MESH_SCRIPT = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
import jax
from jax.sharding import PartitionSpec as P
import conftest as T
T.register_tiny_kind()
from dictlearn.trainers import sharding
from dictlearn.trainers.data import ArraySource
from dictlearn.trainers.logging import WandbConfig
from dictlearn.trainers.sgd import train

out = Path(sys.argv[1])
assert len(jax.devices()) == 4, jax.devices()
x = T.planted(n_rows=1024)
report = {{}}
for data, model in [(1, 1), (2, 2)]:
    mesh = sharding.make_mesh(data, model, devices=jax.devices()[: data * model])
    folder = out / f"mesh{{data}}x{{model}}"
    train([T.spec(folder)], ArraySource({{"act": x}}, 64, 0), T.train_cfg(n_steps=40, checkpoint_every=40, log_every=40),
          WandbConfig(mode="disabled"), mesh=mesh, log_dir=folder)
    # how the state and a batch are laid out on this mesh
    spec = T.spec(folder)
    import dictlearn.decomposers.base as base
    from flax import nnx
    state = nnx.state(base.build(spec.kind, spec.config))
    placed = sharding.place(state, sharding.tree_shardings(state, mesh, spec.config.n_features))
    batch = sharding.put_batch({{"act": x[:64]}}, sharding.batch_sharding(mesh))["act"]
    report[f"{{data}}x{{model}}"] = {{
        "W_enc": list(placed["W_enc"].get_value().sharding.spec), "W_dec": list(placed["W_dec"].get_value().sharding.spec),
        "b_pre": list(placed["b_pre"].get_value().sharding.spec),
        "W_enc_shard_shape": list(placed["W_enc"].get_value().addressable_shards[0].data.shape),
        "batch_shard_rows": batch.addressable_shards[0].data.shape[0], "batch_devices": len(batch.devices()),
    }}
print("REPORT" + json.dumps(report))
"""


def _params(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "decomposers" / "tiny" / "params.safetensors"))


def test_sharded_step_matches_single_device(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout.split("REPORT", 1)[1])
    # the latent axis is split over "model", the rows of a batch over "data"
    assert report["2x2"]["W_enc"] == [None, "model"] and report["2x2"]["W_dec"] == ["model", None]
    assert report["2x2"]["b_pre"] == [None] and report["2x2"]["W_enc_shard_shape"] == [16, 32]
    assert report["2x2"]["batch_shard_rows"] == 32 and report["2x2"]["batch_devices"] == 4
    assert report["1x1"]["batch_devices"] == 1 and report["1x1"]["W_enc_shard_shape"] == [16, 64]
    assert "on a 2 x 2 (data x model) mesh" in run.stdout
    single = _params(tmp_path / "mesh1x1")
    for mesh in ("mesh2x2",):
        sharded = _params(tmp_path / mesh)
        for key, value in single.items():
            np.testing.assert_allclose(sharded[key], value, rtol=RTOL, atol=ATOL, err_msg=f"{mesh} {key}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three subprocesses: about a minute on two busy cores
def test_two_processes_with_jax_distributed_match_one(tmp_path):
    """`dictlearn train` as two processes (gloo collectives on one machine) forming a 2-device data mesh."""
    from conftest import CLI_CONFIG, planted, write_cache

    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=2048)})

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.toml"
        text = CLI_CONFIG.format(out=tmp_path / name, wandb="disabled").replace("[train]\n", f'[train]\ncache = "{cache}"\n')
        path.write_text(text)
        return path

    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import conftest; conftest.register_tiny_kind(); "
              "from dictlearn.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}
    env.pop("XLA_FLAGS", None)
    common = ["--set", "train.n_steps=40", "--only", "tiny32"]
    port = _free_port()
    dist = ["--set", "train.distributed=true", "--set", f'train.coordinator_address="127.0.0.1:{port}"',
            "--set", "train.num_processes=2"]
    procs = [subprocess.Popen([sys.executable, "-c", script, "train", str(config("two")), *common, *dist,
                               "--set", f"train.process_id={i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    assert "on a 2 x 1 (data x model) mesh" in outputs[0]
    one = subprocess.run([sys.executable, "-c", script, "train", str(config("one")), *common], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    a = load_file(str(tmp_path / "two" / "decomposers" / "tiny32" / "params.safetensors"))
    b = load_file(str(tmp_path / "one" / "decomposers" / "tiny32" / "params.safetensors"))
    for key, value in b.items():
        np.testing.assert_allclose(a[key], value, rtol=RTOL, atol=ATOL, err_msg=key)
