"""Orbax checkpoints of one decomposer under training: everything needed to continue bit for bit.

Each checkpoint step holds four items: `model` (every nnx variable of the decomposer: parameters,
buffers such as its own dead-latent counters, rng state if it keeps one), `optimizer` (Adam moments
and step count), `trainer` (the trainer's dead-latent counters) and `meta` (JSON: step, loader position,
seed, input scales and the run signature). The loader is deterministic in (seed, batch index), so the
batch index is the whole loader position. Orbax writes each step to a temporary folder and renames it
when complete, so a run killed mid-save leaves the previous step intact; a step whose files were damaged
after that (a truncated file, a full disk) is skipped on resume, with a line saying so, in favour of the newest
step that restores (`restore_newest`). A resume with different settings, or on a different activation cache,
is refused naming only the settings that differ (`check_signature`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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

    def delete(self, step: int) -> None:
        """Remove `step` (e.g. one that does not restore, or one newer than the step a run resumed from)."""
        self.manager.delete(step)

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
    shared = _shared_steps(checkpointers)
    return shared[-1] if shared else None


def _shared_steps(checkpointers: list[Checkpointer]) -> list[int]:
    if not checkpointers:
        return []
    shared = set(checkpointers[0].steps())
    for c in checkpointers[1:]:
        shared &= set(c.steps())
    return sorted(shared)


# ---- the run signature: what must match for a resume to continue the same computation ----------------

CACHE_KEY = "data"  # the signature entry holding the activation cache's identity (its manifest fingerprint),
# set by the trainer: checkpoints trained on one cache never resume on another (that would mix two data sets)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ABSENT = object()


def signature_differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per differing setting, nested keys dotted (`config.k: saved 8, now 16`)."""
    a, b = _flat(found), _flat(expected)
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if x != y:
            out.append(f"{key}: saved {'(not recorded)' if x is _ABSENT else _short(x)}, "
                       f"now {'(not set)' if y is _ABSENT else _short(y)}")
    return out


def check_signature(folder: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume from checkpoints written with different settings (the result would differ)."""
    diff = signature_differences(found, expected)
    if not diff:
        return
    why = ""
    if found.get(CACHE_KEY, _ABSENT) != expected.get(CACHE_KEY, _ABSENT):
        why = (" The activation cache is not the one these checkpoints were trained on: resuming would mix two "
               "data sets, so point train.cache back at the original cache or start over.")
    raise CheckpointMismatch(
        f"the checkpoints in {folder} were written with different settings ({'; '.join(diff)}).{why} "
        f"Restore the earlier settings to resume, or delete {folder} to start this decomposer over."
    )


# ---- resuming: the newest step that every decomposer of a pass can read back -------------------------

@dataclass
class Resumed:
    """Where a pass resumes: the step, and per checkpointer its restored (model, optimizer, trainer) and meta."""

    step: int
    states: list[tuple[Any, Any, dict]]
    metas: list[dict[str, Any]]


def _reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    for noise in (" See full TensorStore details", " [tensorstore_spec"):  # long specs say nothing to a user
        first = first.split(noise)[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def restore_newest(
    checkpointers: list[Checkpointer],
    templates: list[tuple[Any, Any, dict]],
    signatures: list[dict[str, Any]],
    say: Callable[[str], None] = print,
) -> Resumed | None:
    """Restore the newest step every checkpointer holds and can read back whole (None: no checkpoints).

    A step whose files do not restore (a truncated or corrupt write) is skipped with a line saying which
    step of which folder and why, and the next older shared step is tried. Once one restores, every newer
    step is deleted (all of them are recomputed exactly by the resumed run, and orbax would refuse to write
    them again). Settings that differ are refused (CheckpointMismatch), never skipped; so are checkpoints
    that only some decomposers of the pass hold, and a folder where no shared step restores."""
    shared = _shared_steps(checkpointers)
    if not shared:
        have = [str(c.folder) for c in checkpointers if c.steps()]
        if have:
            raise CheckpointMismatch(
                f"{', '.join(have)} hold checkpoints but the other decomposers of this pass have none at the same "
                f"step, so they cannot resume together: train the new ones separately with --only NAME, or delete "
                f"those checkpoints folders to start over")
        return None
    failures = []
    for step in reversed(shared):
        got = _restore_all(step, checkpointers, templates, signatures)
        if isinstance(got, Resumed):
            for c in checkpointers:
                for newer in [s for s in c.steps() if s > step]:
                    c.delete(newer)
            if failures:
                say(f"resuming from checkpoint step {step}, the newest that restores; the newer steps were removed "
                    f"and will be computed again")
            return got
        failures.append(got)
        say(f"skipping checkpoint step {step} in {got[0]}: it does not restore ({got[1]})")
    folder, reason = failures[0]
    raise CheckpointMismatch(
        f"no checkpoint step restores (steps {', '.join(map(str, shared))}; the newest, in {folder}: {reason}). "
        f"If the code or the decomposer's structure changed, restore it; otherwise delete the checkpoints "
        f"folders to start over")


def _restore_all(step: int, checkpointers: list[Checkpointer], templates: list[tuple[Any, Any, dict]],
                 signatures: list[dict[str, Any]]) -> Resumed | tuple[Path, str]:
    """Every checkpointer's `step` restored (settings checked), or (folder, reason) for the first that fails."""
    states, metas = [], []
    for c, template, expected in zip(checkpointers, templates, signatures):
        try:
            meta = c.meta(step)
        except Exception as e:  # orbax/TensorStore raise plain Exceptions for unreadable files
            return c.folder, _reason(e)
        check_signature(c.folder, meta.get("signature", {}), expected)
        try:
            model, optimizer, trainer, meta = c.restore(step, *template)
        except Exception as e:
            return c.folder, _reason(e)
        states.append((model, optimizer, trainer))
        metas.append(meta)
    return Resumed(step, states, metas)
