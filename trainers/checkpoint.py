"""Orbax checkpoints of one decomposer under training: everything needed to continue bit for bit.

Each checkpoint step holds four items: `model` (every nnx variable of the decomposer: parameters,
buffers such as its own dead-latent counters, rng state if it keeps one), `optimizer` (Adam moments
and step count), `trainer` (the trainer's dead-latent counters) and `meta` (JSON: step, loader position,
seed, input scales and the run signature). The loader is deterministic in (seed, batch index), so the
batch index is the whole loader position. Orbax writes each step to a temporary folder and renames it
when complete, so a run killed mid-save leaves the previous step intact.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointMismatch(RuntimeError):
    """Checkpoints on disk were written by a run with a different configuration."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _savable(state: Any) -> Any:
    """A pure dict of plain arrays (typed PRNG keys as their raw uint32 data)."""
    pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, pure)


def _abstract(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), _savable(state))


def _rebuild(template: Any, restored: Any) -> Any:
    """`restored` (pure, keys as data) in the structure and key types of `template`."""
    if isinstance(template, nnx.State):
        pure_template = nnx.to_pure_dict(template)
        fixed = jax.tree.map(
            lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_key(t) else r,
            pure_template, restored,
        )
        out = jax.tree.map(lambda x: x, template)  # a copy to fill in
        nnx.replace_by_pure_dict(out, fixed)
        return out
    return restored


class Checkpointer:
    """An orbax CheckpointManager in `folder` keeping the last `keep` steps."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder = Path(folder).absolute()
        self.keep = max(2, keep)  # two, so a step every decomposer of a pass holds always survives
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.folder, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, model: Any, optimizer: Any, trainer: dict[str, Any], meta: dict[str, Any]) -> None:
        """Start writing `step` (asynchronously; arrays are copied to host before this returns)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(_savable(model)),
                optimizer=ocp.args.StandardSave(_savable(optimizer)),
                trainer=ocp.args.StandardSave(_savable(trainer)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, model: Any, optimizer: Any, trainer: dict[str, Any]) -> tuple[Any, Any, dict, dict]:
        """Read `step` into the structure, dtypes and shardings of the given templates."""
        got = self.manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(_abstract(model)),
                optimizer=ocp.args.StandardRestore(_abstract(optimizer)),
                trainer=ocp.args.StandardRestore(_abstract(trainer)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return _rebuild(model, got["model"]), _rebuild(optimizer, got["optimizer"]), got["trainer"], got["meta"]

    def restore_model(self, step: int, model: Any) -> Any:
        """Only the decomposer's state at `step` (as trained: on scaled inputs), e.g. to inspect a run."""
        got = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(model))))
        return _rebuild(model, got["model"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def clear(self) -> None:
        """Remove every checkpoint (a fresh start over unusable leftovers)."""
        self.manager.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.manager = self._open()


def common_step(checkpointers: list[Checkpointer]) -> int | None:
    """The latest step every checkpointer holds (None: start fresh)."""
    if not checkpointers:
        return None
    shared = set(checkpointers[0].steps())
    for c in checkpointers[1:]:
        shared &= set(c.steps())
    return max(shared) if shared else None


def check_signature(folder: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume from checkpoints written with different settings (the result would differ)."""
    if found == expected:
        return
    keys = sorted(set(found) | set(expected))
    diff = [f"{k}: checkpoint {found.get(k)!r} vs now {expected.get(k)!r}" for k in keys if found.get(k) != expected.get(k)]
    raise CheckpointMismatch(
        f"the checkpoints in {folder} were written with different settings ({'; '.join(diff)}). "
        f"Restore the earlier settings to resume, or delete {folder} to start this decomposer over."
    )
