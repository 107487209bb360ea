"""Device layout for training: a ("data", "model") mesh, the batch split over "data", latents over "model".

Single device: a 1 x 1 mesh, and every function here is a plain device_put. Several devices in one
process: `XLA_FLAGS=--xla_force_host_platform_device_count=N` simulates them on a CPU. Several hosts:
call `initialize_distributed` first. Every process then either loads the same global batch (deterministic
loader) and hands the devices it owns their rows of it, or, with reader slices, loads only a contiguous
block of rows covering its devices' rows (`process_rows`) and hands those on (`put_batch(start=...)`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")


def make_mesh(data: int = 0, model: int = 1, devices: list | None = None) -> Mesh:
    """A data x model mesh over `devices` (default: all); data = 0 uses every device left over."""
    devices = list(jax.devices() if devices is None else devices)
    if model <= 0 or len(devices) % model:
        raise ValueError(f"mesh_model = {model} must be positive and divide the {len(devices)} device(s)")
    data = data or len(devices) // model
    if data * model != len(devices):
        if data * model > len(devices):
            raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; there are {len(devices)}")
        devices = devices[: data * model]
    return Mesh(np.array(devices).reshape(data, model), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the data axis, features replicated."""
    return NamedSharding(mesh, P("data", None))


def latent_sharding(mesh: Mesh, shape: tuple[int, ...], n_features: int) -> NamedSharding:
    """Shard the axis of length n_features over "model" (when it divides); replicate the rest.

    Every latent-indexed array (encoder columns, decoder rows, encoder bias, thresholds, dead
    counters, and the Adam moments of each) thereby lives beside its latents. When several axes have
    that length, the first axis wins, then the last: latents lead (n_features, d) decoder rows and
    trail a cross-layer transcoder's (layers, d_in, n_features) encoder and (layers, n_features) biases."""
    model = mesh.shape["model"]
    spec: list[str | None] = [None] * len(shape)
    if model > 1 and n_features % model == 0:
        order = [0, len(shape) - 1, *range(1, len(shape) - 1)] if shape else []
        for axis in dict.fromkeys(order):
            if shape[axis] == n_features:
                spec[axis] = "model"
                break
    return NamedSharding(mesh, P(*spec))


def tree_shardings(tree: Any, mesh: Mesh, n_features: int) -> Any:
    return jax.tree.map(lambda x: latent_sharding(mesh, np.shape(x), n_features), tree)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def place(tree: Any, shardings: Any) -> Any:
    """Put every leaf of `tree` on the mesh with its sharding; works across processes too (each
    process passes the same full value and keeps the shards its devices own)."""

    def put(x, sharding):
        if _is_key(x):
            impl = jax.random.key_impl(x)
            data = put(jax.random.key_data(x), NamedSharding(sharding.mesh, P()))
            return jax.random.wrap_key_data(data, impl=impl)
        host = np.asarray(to_host(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def process_rows(sharding: NamedSharding, rows: int) -> tuple[int, int]:
    """[start, stop): the smallest block of a global batch of `rows` rows that holds every row this process's
    devices get under `sharding` (all of it where the batch axis is replicated or spans every device here)."""
    spans = [index[0].indices(rows)[:2] for index in sharding.addressable_devices_indices_map((rows, 1)).values()]
    return min(a for a, _ in spans), max(b for _, b in spans)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding, start: int = 0, rows: int = 0
              ) -> dict[str, jax.Array]:
    """A global batch of `rows` rows on the mesh, from the rows [start, start + len) of it that `batch` holds
    (default: the whole batch). Each process passes rows covering `process_rows`; only those are used."""
    held = next(iter(batch.values())).shape[0]
    rows = rows or held
    data = sharding.mesh.shape["data"]
    if rows % data:
        raise ValueError(f"batch_size {rows} must be a multiple of the mesh's data axis ({data} devices)")
    need = process_rows(sharding, rows) if held != rows else (0, rows)
    if need[0] < start or need[1] > start + held:
        raise ValueError(f"this process's devices take rows {need[0]}-{need[1] - 1} of the batch, but it holds "
                         f"rows {start}-{start + held - 1}")

    def local(index, v):
        a, b, _ = index[0].indices(rows)
        return v[(slice(a - start, b - start), *index[1:])]

    return {k: jax.make_array_from_callback((rows, *v.shape[1:]), sharding, lambda index, v=v: local(index, v))
            for k, v in batch.items()}


def to_host(x: Any) -> Any:
    """A numpy copy of an array. An array spanning several processes is read from this process's
    replica when it is replicated, else gathered (a collective: every process must call it)."""
    if _is_key(x):
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def fetch(tree: Any) -> Any:
    """`to_host` over a pytree (metrics, states): jax.device_get that also works across processes."""
    return jax.tree.map(to_host, tree)


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Join a multi-process JAX job (before any other JAX call).

    With no arguments JAX detects the cluster (SLURM, Open MPI, TPU pods, Kubernetes); otherwise all
    three are needed. On CPU the collectives go through gloo (two processes on one machine work)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPU devices use it
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("train.coordinator_address needs train.num_processes and train.process_id as well")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)

