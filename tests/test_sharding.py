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
    """`dictlearn train` as two processes (gloo collectives on one machine) forming a 2-device data mesh, each
    reading one of 2 reader slices: the parameters equal one process reading both slices, and each process
    read half of that process's rows (and bytes)."""
    from conftest import CLI_CONFIG, planted, write_cache

    cache = write_cache(tmp_path / "cache", {"act": planted(n_rows=2560)}, n_shards=5)  # 4 train shards of 512 rows

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.toml"
        text = CLI_CONFIG.format(out=tmp_path / name, wandb="disabled").replace("[train]\n", f'[train]\ncache = "{cache}"\n')
        path.write_text(text)
        return path

    # each process reports what its cache sources read for training batches
    script = (f"import json, sys; sys.path.insert(0, {str(TESTS)!r}); import conftest; conftest.register_tiny_kind(); "
              "from dictlearn.trainers import data; made = []; init = data.CacheSource.__init__; "
              "data.CacheSource.__init__ = lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0]; "
              "from dictlearn.cli import main; rc = main(sys.argv[1:]); "
              "print('READS' + json.dumps([s.reads() for s in made])); sys.exit(rc)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}
    env.pop("XLA_FLAGS", None)
    common = ["--set", "train.n_steps=40", "--set", "train.reader_slices=2", "--only", "tiny32"]
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

    def reads(output: str) -> dict[str, int]:
        made = json.loads(output.rsplit("READS", 1)[1].splitlines()[0])
        return {k: sum(m[k] for m in made) for k in ("rows", "bytes")}

    alone, each = reads(one.stdout), [reads(o) for o in outputs]
    # 40 steps of 32 rows per slice: 2 epochs of a slice's 1,024 rows (its 2 shards, one window) per slice
    assert alone == {"rows": 4096, "bytes": 4096 * 16 * 4}
    assert each == [{"rows": 2048, "bytes": 2048 * 16 * 4}] * 2


def test_a_process_must_hold_the_rows_its_devices_take():
    """put_batch with part of a batch: refused, naming the rows, when the devices here take rows it lacks."""
    import jax

    from dictlearn.trainers import sharding

    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    rows = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    whole = sharding.put_batch({"x": rows}, sharding.batch_sharding(mesh))["x"]
    assert sharding.process_rows(sharding.batch_sharding(mesh), 64) == (0, 64)
    with pytest.raises(ValueError, match="take rows 0-63 of the batch, but it holds rows 16-63"):
        sharding.put_batch({"x": rows[16:]}, sharding.batch_sharding(mesh), start=16, rows=64)
    np.testing.assert_array_equal(np.asarray(whole), rows)


def test_mesh_batches_read_in_slices_from_a_cache_only(tmp_path):
    """One process with reader slices puts the sliced loader's global batches on the mesh; a source that
    cannot read in slices (arrays in memory) is refused with a sentence."""
    import itertools

    import jax

    from conftest import planted, write_cache
    from dictlearn.activations.cache import ActivationCache
    from dictlearn.activations.loader import BatchLoader
    from dictlearn.config import ConfigError
    from dictlearn.trainers import sharding
    from dictlearn.trainers.data import ArraySource, CacheSource, mesh_batches

    cache = ActivationCache.open(write_cache(tmp_path / "cache", {"act": planted(n_rows=1280)}, n_shards=5))
    where = sharding.batch_sharding(sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
    source = CacheSource(cache, ["act"], 64, seed=1)
    batches = mesh_batches(source, 3, ["act"], where, reader_slices=2)
    got = [np.asarray(b["act"]) for b in itertools.islice(batches, 2)]
    batches.close()
    want = BatchLoader(cache, ["act"], 64, seed=1, slices=2)
    assert all(np.array_equal(g, want.batch(3 + i)["act"]) for i, g in enumerate(got))
    assert source.reads()["rows"] == 1024  # both slices' one window (2 shards of 256 rows each)
    with pytest.raises(ConfigError, match="reader_slices = 2 needs a source that reads in slices"):
        mesh_batches(ArraySource({"act": planted(n_rows=256)}, 64), 0, ["act"], where, reader_slices=2)
