"""The SGD trainer: several autoencoder-style decomposers trained in one pass over the same batches.

Per step, for every decomposer and inside one jitted function: `loss(batch)` under value-and-grad,
`project_grads`, the Adam update and `after_step` (where a decomposer updates its own state, such as its
dead-latent counters). The function is pure (`nnx.split` state in, state out, donated), so the hot path
carries no Python graph traversal and the state is exactly what a checkpoint holds.

Inputs are scaled to unit mean squared norm per activation key (x and y of a transcoder get separate
scales); the saved dictionary has the scales folded back in and reads raw activations.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dictlearn.config import ConfigError, from_dict
from dictlearn.decomposers import base
from dictlearn.trainers import optim, scaling, sharding
from dictlearn.trainers.checkpoint import CACHE_KEY, CheckpointMismatch, Checkpointer, common_step, restore_newest
from dictlearn.trainers.data import BatchSource, mesh_batches
from dictlearn.trainers.diskfull import disk_full, is_disk_full
from dictlearn.trainers.logging import LOG_FILE, TrainLogger, WandbConfig, read_log
from dictlearn.trainers.spec import NAME_RE, DecomposerSpec, TrainResult, data_keys  # noqa: F401 (re-exported)

CHECKPOINT_DIR = "checkpoints"
SOURCES = ("cache", "model")  # where training rows come from: the harvested cache, or the model online
REMOVED_KEYS = {  # [train] keys that no longer exist -> what to do instead
    "dead_window_tokens": "dead latents are counted by each decomposer now: set `dead_tokens` in its "
                          "[[decomposers]] table instead",
}


@dataclasses.dataclass
class TrainConfig:
    """The `[train]` table: shared by every decomposer trained in one pass."""

    batch_size: int = 4096  # rows per step (a multiple of the mesh's data axis)
    n_tokens: int = 0  # total training tokens; 0: use n_steps
    n_steps: int = 0  # optimiser steps; 0 and n_tokens 0: one epoch of the cache's train split
    lr: float = 2e-4  # a [[decomposers]] table may set its own `lr`
    warmup_steps: int = 1000  # linear learning-rate warm-up from 0
    decay: str = "linear"  # none | linear | cosine, over the last decay_fraction of the steps
    decay_fraction: float = 0.2  # final share of the steps over which lr decays linearly
    final_lr_fraction: float = 0.0  # lr at the last step, as a fraction of lr
    adam_b1: float = 0.9  # Adam first-moment decay
    adam_b2: float = 0.999  # Adam second-moment decay
    adam_eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 0.0  # global-norm clipping; 0: off
    scale_inputs: bool = True  # train on activations scaled to unit mean squared norm
    sample_tokens: int = 65536  # rows drawn to estimate the scales and for init_from_data
    log_every: int = 100  # steps between train_log.jsonl lines (and wandb points)
    checkpoint_every: int = 1000  # steps between orbax checkpoints (a kill resumes from the last)
    keep_checkpoints: int = 2  # checkpoints kept per decomposer
    seed: int = 0  # loader shuffling and the sample draw
    progress: bool = True  # show a tqdm progress bar
    cache: str = ""  # activation cache folder; "": <out_dir>/cache
    source: str = "cache"  # "cache": train on the harvested cache; "model": the model computes the rows as training runs (no train cache)
    mesh_data: int = 0  # devices on the batch axis; 0: all devices / mesh_model
    mesh_model: int = 1  # devices on the latent axis
    distributed: bool = False  # call jax.distributed.initialize (several processes or hosts)
    coordinator_address: str = ""  # "host:port"; "": let JAX detect the cluster
    num_processes: int = 0  # distributed: processes in the job (0: from the environment)
    process_id: int = -1  # distributed: this process's index (-1: from the environment)
    reader_slices: int = 1  # cache readers each batch is split over; several processes: their count (each reads its own)

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "checkpoint_every", "sample_tokens", "reader_slices"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.reader_slices:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of reader_slices {self.reader_slices}")
        if self.n_tokens < 0 or self.n_steps < 0 or self.warmup_steps < 0:
            raise ValueError("n_tokens, n_steps and warmup_steps must not be negative")
        if self.n_tokens and self.n_steps:
            raise ValueError("give n_tokens or n_steps, not both")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.decay not in optim.DECAYS:
            raise ValueError(f"decay must be one of {', '.join(optim.DECAYS)}, got {self.decay!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")

    def total_steps(self, rows: int) -> int:
        if self.n_steps:
            return self.n_steps
        if self.n_tokens:
            return max(1, self.n_tokens // self.batch_size)
        return max(1, rows // self.batch_size)

    def math(self) -> dict[str, Any]:
        """The fields that change the trained parameters (a resumed run must match them)."""
        keep = ("batch_size", "warmup_steps", "decay", "decay_fraction", "final_lr_fraction", "adam_b1", "adam_b2",
                "adam_eps", "grad_clip", "scale_inputs", "sample_tokens", "seed")
        sliced = {"reader_slices": self.reader_slices} if self.reader_slices != 1 else {}  # 1: as before the option
        return {**{k: getattr(self, k) for k in keep}, **sliced}


def train_config(table: dict[str, Any], where: str = "[train]") -> TrainConfig:
    """The [train] table parsed strictly; a key that was removed says what replaced it."""
    for key, instead in REMOVED_KEYS.items():
        if key in table:
            raise ConfigError(f"{where}: `{key}` is no longer a [train] option: {instead}")
    return from_dict(TrainConfig, table, where=where)


@dataclasses.dataclass
class SGDOptions:
    """The SGD trainer's keys in a `[[decomposers]]` table."""

    lr: float | None = None  # this decomposer's peak learning rate (None: train.lr)

    def __post_init__(self) -> None:
        if self.lr is not None and (isinstance(self.lr, bool) or self.lr <= 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")


OPTIONS = SGDOptions


class NonFiniteLoss(RuntimeError):
    """Training produced a nan or inf loss; the run stopped and kept its last good checkpoint."""


def finished(folder: str | Path) -> bool:
    """A decomposer folder holding a saved dictionary (written last, after the final checkpoint)."""
    folder = Path(folder)
    return (folder / base.CONFIG_FILE).is_file() and (folder / base.PARAMS_FILE).is_file()


Scale = float | np.ndarray  # an input scale: one float, or one per site for a site-axis kind


@dataclasses.dataclass
class _Member:
    """A decomposer under training and everything the loop needs to know about it."""

    spec: DecomposerSpec
    lr: float
    schedule: Any
    model_def: Any
    opt_def: Any
    checkpointer: Checkpointer
    signature: dict[str, Any]
    scale_in: Scale = 1.0  # a float; for a site-axis kind one per site, a float32 array (L,)
    scale_out: Scale = 1.0

    def view(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The decomposer's batch: scaled x and y; the gradient w.r.t. the scaled y (chain rule: g / s).
        A site-axis kind gets its sites stacked, (B, L, d), each scaled by its own factor."""
        if self.spec.site_axis:
            out = {"x": _stack(batch, self.spec.x_keys, self.scale_in), "y": _stack(batch, self.spec.y_keys, self.scale_out)}
            if self.spec.config.needs_grad:
                out["grad"] = _stack(batch, self.spec.grad_keys, 1.0 / self.scale_out)
            return out
        out = {"x": batch[self.spec.x_key] * self.scale_in, "y": batch[self.spec.y_key] * self.scale_out}
        if self.spec.config.needs_grad:
            out["grad"] = batch[self.spec.grad_key] / self.scale_out
        return out


def _stack(batch: dict, keys: list[str], scales: np.ndarray):
    """(B, L, d): the arrays of `keys` stacked on axis 1, site l multiplied by scales[l] (numpy or jax)."""
    xp = np if isinstance(batch[keys[0]], np.ndarray) else jnp
    return xp.stack([batch[k] for k in keys], axis=1) * np.asarray(scales, np.float32)[:, None]


def _scale_to_json(scale: Scale) -> float | list[float]:
    return [float(v) for v in scale] if isinstance(scale, np.ndarray) else scale


def _scale_from_json(value: float | list[float]) -> Scale:
    return np.asarray(value, np.float32) if isinstance(value, list) else value


def _check_float32(model: base.Decomposer, name: str) -> None:
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        dtype = var.get_value().dtype
        if dtype != jnp.float32:
            raise TypeError(f"decomposer {name!r}: parameter {'.'.join(map(str, path))} is {dtype}; "
                            f"the trainer keeps parameters and optimiser state in float32")


def _signature(spec: DecomposerSpec, cfg: TrainConfig, lr: float, n_steps: int, data: str | None) -> dict[str, Any]:
    """Everything that decides the parameters: a resume must match it (data: the cache's identity)."""
    sig = {"kind": spec.kind, "config": dataclasses.asdict(spec.config), "lr": lr, "n_steps": n_steps, **cfg.math(),
           CACHE_KEY: data}
    return json.loads(json.dumps(sig))


def _make_step(members: list[_Member]):
    """The pure step over every member: (states, batch) -> (states, per-member scalars).

    Besides the decomposer's own scalar metrics (dead_frac among them where the decomposer counts dead
    latents), each member reports the learning rate it used and `finite`: loss and every parameter finite."""

    def step(states, batch):
        new_states, outs = [], []
        for m, (model_state, opt_state) in zip(members, states):
            model = nnx.merge(m.model_def, model_state)
            opt = nnx.merge(m.opt_def, opt_state)
            view = m.view(batch)
            lr = m.schedule(opt.step[...])
            (loss, metrics), grads = model.loss_and_grads(view)
            grads = model.project_grads(grads)
            opt.update(model, grads)
            model.after_step(metrics)
            new_model_state = nnx.state(model)
            params = jax.tree.leaves(nnx.state(model, nnx.Param))
            scalars = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items() if jnp.ndim(v) == 0}
            scalars.update(
                loss=jnp.asarray(loss, jnp.float32),
                lr=jnp.asarray(lr, jnp.float32),
                finite=jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in params])),
            )
            new_states.append((new_model_state, nnx.state(opt)))
            outs.append(scalars)
        return new_states, outs

    return step


LAST_VALUE = ("lr", "dead_frac")  # logged as at the logging step; the other metrics as means since the last log


def train(
    specs: list[DecomposerSpec],
    source: BatchSource,
    cfg: TrainConfig,
    wandb_cfg: WandbConfig | None = None,
    *,
    log_dir: str | Path | None = None,
    mesh: jax.sharding.Mesh | None = None,
    output_projection: Any = None,  # part of the trainer protocol; SGD has no use for it
) -> TrainResult:
    """Train every spec on `source` in one pass; resume from their checkpoints when they hold one.

    Each spec's folder gets config.json + params.safetensors on raw activations, train_log.jsonl and
    checkpoints/; wandb writes under `log_dir` (default: the folder above the specs' folders). Raises
    NonFiniteLoss (keeping the last good checkpoint) if a loss turns nan or inf, and DiskFull, saying
    that the same command resumes, when the disk fills."""
    if not specs:
        return TrainResult({}, {}, {})
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"decomposer names must be unique, got {names}")
    missing = sorted(set(data_keys(specs)) - set(source.keys))
    if missing:
        raise ValueError(f"the batch source lacks key(s) {missing}; it has {source.keys}")
    log_dir = Path(log_dir) if log_dir is not None else specs[0].folder.parent
    wandb_cfg = wandb_cfg or WandbConfig()
    mesh = mesh or sharding.make_mesh(cfg.mesh_data, cfg.mesh_model)
    main_process = jax.process_index() == 0
    n_steps = cfg.total_steps(source.rows())
    batch_size = source.batch_size
    if batch_size != cfg.batch_size:
        raise ValueError(f"the batch source yields batches of {batch_size}, the config asks for {cfg.batch_size}")

    members, models = _build(specs, cfg, n_steps, getattr(source, "identity", None))
    _check_same_data(members, source)
    states, shardings = _place(members, models, cfg, mesh)
    resumed = restore_newest([m.checkpointer for m in members], [(*s, _trainer_state(0, mesh)) for s in states],
                             [m.signature for m in members], say=print if main_process else (lambda text: None))
    if resumed is None:  # a fresh start: scales and data-dependent init from a sample, then lay out again
        _init_from_sample(members, models, source.sample(cfg.sample_tokens), cfg.scale_inputs)
        states, shardings = _place(members, models, cfg, mesh)
        start = 0
    else:
        for m, meta in zip(members, resumed.metas):
            m.scale_in, m.scale_out = _scale_from_json(meta["scale_in"]), _scale_from_json(meta["scale_out"])
        states = [(model_state, opt_state) for model_state, opt_state, _ in resumed.states]
        start = resumed.step

    step_fn = jax.jit(_make_step(members), donate_argnums=0, out_shardings=(shardings, None))
    batch_sharding = sharding.batch_sharding(mesh)
    keys = data_keys(specs)

    logger = TrainLogger(
        log_dir,
        {m.spec.name: m.spec.folder / LOG_FILE for m in members},
        wandb_cfg,
        config={"train": dataclasses.asdict(cfg), "n_steps": n_steps,
                "decomposers": {m.spec.name: {"kind": m.spec.kind, "lr": m.lr, **dataclasses.asdict(m.spec.config)}
                                for m in members}},
        n_steps=n_steps,
        start_step=start,
        progress=cfg.progress,
        enabled=main_process,
    )
    what = ", ".join(f"{m.spec.name} ({m.spec.kind})" for m in members)
    if start:
        logger.message(f"resuming {what} at step {start} of {n_steps} (loader batch {start})")
    else:
        logger.message(f"training {what} for {n_steps} steps of {batch_size} tokens on a "
                       f"{mesh.shape['data']} x {mesh.shape['model']} (data x model) mesh")

    def save_checkpoint(step: int) -> None:
        for m, (model_state, opt_state) in zip(members, states):
            meta = {"step": step, "batch_index": step, "tokens": step * batch_size, "seed": cfg.seed,
                    "scale_in": _scale_to_json(m.scale_in), "scale_out": _scale_to_json(m.scale_out), "signature": m.signature,
                    "data_source": getattr(source, "describe", lambda: None)()}
            m.checkpointer.save(step, model_state, opt_state, _trainer_state(step, mesh), meta)

    def check_finite(step: int, outs) -> None:
        """Stop at the first step whose loss or parameters are not finite (checkpoints stay as they were)."""
        flags = sharding.fetch([(o["finite"], o["loss"]) for o in outs])
        for m, (finite, loss) in zip(members, flags):
            if not finite:
                for c in members:
                    c.checkpointer.wait()
                last = common_step([c.checkpointer for c in members])
                kept = (f"the last good checkpoint is step {last} in {m.spec.folder / CHECKPOINT_DIR}"
                        if last is not None else "no checkpoint was written yet")
                what = f"the loss is {loss}" if not np.isfinite(loss) else "a parameter turned nan or inf"
                raise NonFiniteLoss(
                    f"decomposer {m.spec.name!r}: {what} at step {step} of {n_steps}; training stopped "
                    f"and {kept}. Lower train.lr (now {m.lr}), add warm-up, or check the cache for bad values."
                )

    batches = mesh_batches(source, start, keys, batch_sharding, cfg.reader_slices)
    history: list[list[dict[str, jax.Array]]] = []
    pending: tuple[int, Any] | None = None
    tic, tic_step = time.perf_counter(), start
    failed = True
    step = start
    try:
        for step in range(start + 1, n_steps + 1):
            batch = next(batches)
            states, outs = step_fn(states, batch)
            if pending is not None:
                check_finite(*pending)  # the previous step's loss: keeps one step in flight
            pending = (step, outs)
            history.append(outs)
            logger.advance()
            at_log, at_ckpt = step % cfg.log_every == 0 or step == n_steps, step % cfg.checkpoint_every == 0 or step == n_steps
            if at_log or at_ckpt:
                check_finite(*pending)
                pending = None
            if at_log:
                seconds = time.perf_counter() - tic
                records = _records(members, sharding.fetch(history), step, batch_size,
                                   (step - tic_step) * batch_size / max(seconds, 1e-9))
                data_stats = source.stats() if hasattr(source, "stats") else {}  # e.g. an online source's data_wait_frac
                for record in records.values():
                    record.update(data_stats)
                logger.log(step, records)
                history, tic, tic_step = [], time.perf_counter(), step
            if at_ckpt:
                save_checkpoint(step)
        for m in members:
            m.checkpointer.wait()
        decomposers = {}
        for m, state in zip(members, states):
            model_state = sharding.fetch(state[0])  # on every process: gathering may be a collective
            decomposers[m.spec.name] = _final(m, model_state)
            if main_process:
                _save_final(m, decomposers[m.spec.name], cfg, n_steps, batch_size)
        failed = False
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise _disk_full(members, step, n_steps) from None
    finally:
        batches.close()
        _close_quietly(members, failed)
        logger.close(failed=failed)
    logs = {m.spec.name: read_log(m.spec.folder / LOG_FILE) if (m.spec.folder / LOG_FILE).is_file() else []
            for m in members}
    return TrainResult(decomposers, logs, {m.spec.name: m.spec.folder for m in members})


def _trainer_state(step: int, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """What the trainer itself carries between steps: the loader position (the batch index), replicated
    on the mesh (a checkpoint of a multi-process job holds only global arrays)."""
    state = {"batch_index": np.asarray(step, np.int32)}
    return sharding.place(state, sharding.tree_shardings(state, mesh, 1))


def _close_quietly(members: list[_Member], failed: bool) -> None:
    """Close every checkpointer; after a failure, an error while closing must not hide the first one."""
    for m in members:
        try:
            m.checkpointer.close()
        except Exception:
            if not failed:
                raise


def _disk_full(members: list[_Member], step: int, n_steps: int):
    folder = members[0].spec.folder.parent
    last = None
    try:
        last = common_step([m.checkpointer for m in members])
    except Exception:  # listing checkpoints can fail on a full disk too
        pass
    where = f"from the checkpoint at step {last}" if last else "from the start (no checkpoint was complete)"
    names = ", ".join(m.spec.name for m in members)
    return disk_full(folder, f"writing the checkpoints, logs or dictionaries of {names} at step {step} of {n_steps}",
                     where + ".")


def _build(specs: list[DecomposerSpec], cfg: TrainConfig, n_steps: int, data: str | None
           ) -> tuple[list[_Member], list[base.Decomposer]]:
    """Every decomposer (random init from its seed), its schedule and its checkpoint manager."""
    members, models = [], []
    for spec in specs:
        model = base.build(spec.kind, spec.config)
        _check_float32(model, spec.name)
        lr = spec.lr or cfg.lr
        schedule = optim.lr_schedule(lr, n_steps, cfg.warmup_steps, cfg.decay, cfg.decay_fraction, cfg.final_lr_fraction)
        checkpointer = Checkpointer(spec.folder / CHECKPOINT_DIR, cfg.keep_checkpoints)
        members.append(_Member(spec, lr, schedule, None, None, checkpointer, _signature(spec, cfg, lr, n_steps, data)))
        models.append(model)
    return members, models


def _check_same_data(members: list[_Member], source: BatchSource) -> None:
    """Checkpoints written on one cache never resume on another (the run would mix two data sets): the
    refusal names both caches. (The signature check repeats this by identity for any step restored.)"""
    for m in members:
        steps = m.checkpointer.steps()
        if not steps:
            continue
        try:
            meta = m.checkpointer.meta(steps[-1])
        except Exception:  # an unreadable step: restore_newest says so and falls back
            continue
        was, now = meta.get("signature", {}).get(CACHE_KEY), m.signature.get(CACHE_KEY)
        if was == now:
            continue
        before = meta.get("data_source") or f"a cache with identity {was}"
        after = getattr(source, "describe", lambda: None)() or f"a cache with identity {now}"
        raise CheckpointMismatch(
            f"the checkpoints in {m.checkpointer.folder} were written training on {before}, but this run reads "
            f"{after}: resuming would mix two data sets. Point train.cache back at the first cache to resume, or "
            f"delete {m.checkpointer.folder} to train {m.spec.name!r} from the start on the new one."
        )


def _init_from_sample(members: list[_Member], models: list[base.Decomposer], sample: dict, scale_inputs: bool) -> None:
    """A fresh start: input scales from the sample, then each decomposer's data-dependent init on it."""
    scales = scaling.input_scales(sample, [k for m in members for k in m.spec.x_keys + m.spec.y_keys], scale_inputs)
    for m, model in zip(members, models):
        if m.spec.site_axis:
            m.scale_in = np.asarray([scales[k] for k in m.spec.x_keys], np.float32)
            m.scale_out = np.asarray([scales[k] for k in m.spec.y_keys], np.float32)
            x, y = _stack(sample, m.spec.x_keys, m.scale_in), _stack(sample, m.spec.y_keys, m.scale_out)
        else:
            m.scale_in, m.scale_out = scales[m.spec.x_key], scales[m.spec.y_key]
            x, y = sample[m.spec.x_key] * np.float32(m.scale_in), sample[m.spec.y_key] * np.float32(m.scale_out)
        model.init_from_data(jnp.asarray(x), jnp.asarray(y))
        _check_float32(model, m.spec.name)


def _place(members: list[_Member], models: list[base.Decomposer], cfg: TrainConfig, mesh) -> tuple[list, list]:
    """Each member's pure state (model, Adam) laid out on the mesh, and its shardings."""
    states, shardings = [], []
    for m, model in zip(members, models):
        tx = optim.adam(m.schedule, cfg.adam_b1, cfg.adam_b2, cfg.adam_eps, cfg.grad_clip)
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        m.model_def, model_state = nnx.split(model)
        m.opt_def, opt_state = nnx.split(opt)
        state = (model_state, opt_state)
        state_sharding = sharding.tree_shardings(state, mesh, m.spec.config.n_features)
        states.append(sharding.place(state, state_sharding))
        shardings.append(state_sharding)
    return states, shardings


def _records(members: list[_Member], history: list, step: int, batch_size: int, tokens_per_s: float) -> dict:
    """One log record per member: metric means over the steps since the last log, lr and dead_frac as now."""
    records = {}
    for i, m in enumerate(members):
        record = {k: float(np.mean([h[i][k] for h in history])) for k in history[0][i] if k != "finite"}
        record.update({k: float(history[-1][i][k]) for k in LAST_VALUE if k in history[-1][i]})
        record.update(tokens=step * batch_size, tokens_per_s=tokens_per_s)
        records[m.spec.name] = record
    return records


def _final(m: _Member, model_state) -> base.Decomposer:
    """The trained decomposer with its input scales folded in: it reads and writes raw activations."""
    model = nnx.merge(m.model_def, jax.tree.map(jnp.asarray, model_state))
    model.fold_input_scale(m.scale_in, m.scale_out)
    return model


def _save_final(m: _Member, model: base.Decomposer, cfg: TrainConfig, n_steps: int, batch_size: int) -> None:
    """Write the native format."""
    extra = {"trained_steps": n_steps, "trained_tokens": n_steps * batch_size, "lr": m.lr,
             "input_scale": _scale_to_json(m.scale_in), "output_scale": _scale_to_json(m.scale_out),
             "train": dataclasses.asdict(cfg)}
    base.save(model, m.spec.folder, extra=extra)
