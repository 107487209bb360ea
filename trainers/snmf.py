"""Solver loops for semi-NMF: in memory (the paper's algorithm, fused into jitted chunks) and streaming.

In memory: up to `max_rows` rows of `hookpoint_in` are loaded, scaled to unit mean squared norm, and
factorised by `snmf_solver.memory_chunk` (several iterations per dispatch, best solution kept inside
the loop, early stopping with patience). Streaming: minibatches from the cache update decayed sufficient
statistics (X^T G, G^T G) and F from them, for several passes; its F starts from an in-memory solve on
a sample. Either way the result is a `SemiNMF` saved in the native format, with a train_log.jsonl.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.decomposers import base
from dictlearn.decomposers import snmf_solver as solver
from dictlearn.decomposers.snmf import SemiNMF, SNMFConfig
from dictlearn.trainers.data import BatchSource
from dictlearn.trainers.diskfull import disk_full, is_disk_full
from dictlearn.trainers.logging import LOG_FILE, TrainLogger, WandbConfig, read_log
from dictlearn.trainers.spec import DecomposerSpec, TrainResult

SOLVERS = ("memory", "streaming")
INITS = ("random", "svd", "kmeans")


@dataclasses.dataclass
class SNMFOptions:
    """The semi-NMF trainer's keys in a `[[decomposers]]` table (the solver's settings; all optional)."""

    solver: str = "memory"  # memory | streaming
    init: str = "svd"  # svd | random (the paper's default) | kmeans (suits clustered data)
    keep_fraction: float = 0.01  # fraction of d_mlp kept per feature (winner-take-all); 1.0: no sparsity
    inner_steps: int = 5  # multiplicative G updates per F update (the paper: 1)
    refit_steps: int = 10  # conjugate-gradient steps refitting F on its kept support (the paper: 0)
    reseed_every: int = 10  # restart duplicate/dead features every this many iterations or minibatches (0: never)
    max_iters: int = 500  # in-memory iterations at most
    patience: int = 50  # stop after this many iterations without a relative improvement of tol
    tol: float = 1e-4  # relative improvement of the best loss that resets patience
    chunk_iters: int = 10  # iterations per jitted dispatch (and per log record batch)
    max_rows: int = 100_000  # rows loaded for the in-memory solver (a random sample of the train split)
    batch_size: int = 4096  # streaming minibatch rows
    passes: int = 3  # streaming passes over the train split
    forgetting: float = 0.9  # streaming: weight of the old statistics at each minibatch
    code_iters: int = 30  # streaming: steps of the per-batch code solve
    code_solver: str = "pgd"  # streaming: pgd | mu
    init_rows: int = 8192  # streaming: rows of the in-memory solve that starts F
    init_iters: int = 20  # streaming: iterations of that solve
    scale_inputs: bool = True  # solve on activations scaled to unit mean squared norm
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if not 0.0 < self.forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {self.forgetting}")
        if self.code_solver not in ("pgd", "mu"):
            raise ValueError(f"code_solver must be 'pgd' or 'mu', got {self.code_solver!r}")
        for name in ("max_iters", "patience", "chunk_iters", "max_rows", "batch_size", "passes", "code_iters",
                     "init_rows", "init_iters", "inner_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.refit_steps < 0 or self.reseed_every < 0 or self.tol < 0:
            raise ValueError("refit_steps, reseed_every and tol must not be negative")


OPTIONS = SNMFOptions


@dataclasses.dataclass(kw_only=True)
class SNMFTrainConfig(SNMFOptions):
    """One semi-NMF solve on its own (benchmarks, tests): the solver's options plus what to factorise."""

    name: str
    hookpoint_in: str  # mlp_hidden.L: the MLP hidden activation of layer L
    kind: str = "snmf"
    hookpoint_out: str = ""  # must be empty or equal to hookpoint_in
    n_features: int = 0  # K; give this or expansion
    expansion: float = 0.0  # K = expansion * d_mlp
    encode_iters: int = 100  # the saved decomposer's code solve (see SNMFConfig)
    encode_solver: str = "pgd"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "snmf":
            raise ValueError(f"kind must be 'snmf', got {self.kind!r}")
        if (self.n_features > 0) == (self.expansion > 0):
            raise ValueError("give exactly one of n_features (K) and expansion (K = expansion * d_mlp), positive")
        if self.hookpoint_out and self.hookpoint_out != self.hookpoint_in:
            raise ValueError(f"semi-NMF reconstructs its input: hookpoint_out ({self.hookpoint_out!r}) must equal "
                             f"hookpoint_in ({self.hookpoint_in!r}) or be left out")

    def n_features_for(self, d_in: int) -> int:
        return self.n_features if self.n_features > 0 else max(1, int(round(self.expansion * d_in)))


# ----------------------------------------------------------------------------------------------
# In memory


@dataclasses.dataclass
class MemoryResult:
    f: jax.Array  # (d, K): the best F (paper's scaling: code columns have unit norm)
    g: jax.Array  # (n, K): its codes
    best_loss: float  # ||X - G F^T||^2 of the best solution
    best_iter: int  # 0-based iteration that produced it
    iters: int  # iterations run
    losses: list[float]  # loss after every iteration
    seconds: float  # solve time (init included)
    init_seconds: float
    stopped: str  # "max_iters" | "patience" | "target"


def initial_codes(x: jax.Array, k: int, init: str, seed: int) -> jax.Array:
    """G0 (n, K) for the in-memory solver."""
    key = jax.random.PRNGKey(seed)
    if init == "random":
        return solver.init_random(key, x.shape[0], k)
    if init == "svd":
        return solver.init_svd(x, key, k)
    if init == "kmeans":
        return solver.init_kmeans(x, key, k)
    raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")


def fit_memory(
    x: np.ndarray | jax.Array,
    k: int,
    *,
    keep_fraction: float = 0.01,
    init: str | jax.Array = "svd",
    inner_steps: int = 5,
    refit_steps: int = 10,
    reseed_every: int = 10,
    max_iters: int = 500,
    patience: int = 50,
    tol: float = 1e-4,
    chunk_iters: int = 10,
    target_loss: float = -1.0,
    seed: int = 0,
    on_chunk: Callable[[int, np.ndarray, float], None] | None = None,
) -> MemoryResult:
    """Semi-NMF of x (n, d) held in memory. `init` is a name or a G0 (n, K). Stops at max_iters,
    after `patience` iterations without a relative improvement of `tol`, or once the best loss is
    <= target_loss. on_chunk(iterations_done, chunk_losses, best_loss) is called after each dispatch."""
    t0 = time.perf_counter()
    x = jnp.asarray(x, jnp.float32)
    n, d = x.shape
    if not 0 < k <= n:
        raise ValueError(f"K = {k} features need 0 < K <= rows; got {n} rows")
    opts = solver.SolverOptions(keep=solver.keep_count(d, keep_fraction), inner=inner_steps, refit=refit_steps,
                                 reseed_every=reseed_every)
    g0 = initial_codes(x, k, init, seed) if isinstance(init, str) else jnp.asarray(init, jnp.float32)
    if g0.shape != (n, k):
        raise ValueError(f"initial codes must be (n, K) = {(n, k)}, got {g0.shape}")
    sq_x = jnp.vdot(x, x)
    state = solver.memory_state(x, g0)
    state.g.block_until_ready()
    init_seconds = time.perf_counter() - t0
    losses: list[float] = []
    stopped = "max_iters"
    scalars = dict(patience=jnp.asarray(patience, jnp.int32), rel_tol=jnp.asarray(tol, jnp.float32),
                   target=jnp.asarray(target_loss, jnp.float32))
    while len(losses) < max_iters:
        n_iters = min(chunk_iters, max_iters - len(losses))
        state, chunk = solver.memory_chunk(x, sq_x, state, n_iters, opts, **scalars)
        chunk = np.asarray(chunk)[: int(state.it) - len(losses)]  # the iterations this dispatch ran
        losses.extend(float(v) for v in chunk)
        best = float(state.best_loss)
        if not np.isfinite(chunk).all():
            raise FloatingPointError("semi-NMF loss is not finite: the activations hold inf/nan or the solve diverged")
        if on_chunk is not None:
            on_chunk(len(losses), chunk, best)
        if best <= target_loss:
            stopped = "target"
            break
        if len(losses) - 1 - int(state.best_iter) >= patience:
            stopped = "patience"
            break
    return MemoryResult(state.best_f, state.best_g, float(state.best_loss), int(state.best_iter), len(losses), losses,
                        time.perf_counter() - t0, init_seconds, stopped)


# ----------------------------------------------------------------------------------------------
# Streaming


@dataclasses.dataclass
class StreamResult:
    f: jax.Array  # (d, K), unit-norm columns
    batch_losses: list[float]  # each minibatch's loss under the F it was encoded with
    batches: int
    seconds: float


def fit_streaming(
    batches: Iterator[np.ndarray],
    n_batches: int,
    f0: jax.Array,
    *,
    keep_fraction: float = 0.01,
    refit_steps: int = 10,
    reseed_every: int = 10,
    forgetting: float = 0.9,
    code_iters: int = 30,
    code_solver: str = "pgd",
    scale: float = 1.0,
    init_rows: np.ndarray | jax.Array | None = None,
    on_batch: Callable[[int, float, float], None] | None = None,
) -> StreamResult:
    """Streaming semi-NMF over `n_batches` minibatches (B, d) from F0: per batch, codes with F fixed,
    decayed statistics X^T G and G^T G, F from them. on_batch(index, loss, |X_b|^2) after each."""
    t0 = time.perf_counter()
    d = f0.shape[0]
    opts = solver.SolverOptions(keep=solver.keep_count(d, keep_fraction), refit=refit_steps, reseed_every=reseed_every)
    reseed_until = (2 * n_batches) // 3  # the last third settles: a feature restarted then would end unfinished
    state = solver.stream_state(jnp.asarray(f0), init_rows)
    lam = jnp.asarray(forgetting, jnp.float32)
    losses = []
    for i in range(n_batches):
        xb = jnp.asarray(next(batches), jnp.float32) * scale
        reseed = jnp.asarray(reseed_every > 0 and i % reseed_every == 0 and i < reseed_until)
        state, loss = solver.stream_step(state, xb, lam, opts, code_iters, code_solver, reseed)
        losses.append(float(loss))
        if on_batch is not None:
            on_batch(i, losses[-1], float(jnp.vdot(xb, xb)))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError("streaming semi-NMF loss is not finite: the activations hold inf/nan")
    return StreamResult(state.f, losses, n_batches, time.perf_counter() - t0)


def evaluate_loss(f: jax.Array, batches: Iterator[np.ndarray], n_batches: int, *, code_iters: int = 100,
                  code_solver: str = "pgd", scale: float = 1.0) -> tuple[float, float, float]:
    """(sum of ||X_b - G_b F^T||^2, sum of ||X_b||^2, sum of ||X_b - mean||^2) over batches, codes solved
    with F fixed: the loss a dictionary reaches on data, however it was trained."""
    loss = sq = 0.0
    s = np.zeros(f.shape[0], np.float64)
    rows = 0
    for _ in range(n_batches):
        xb = jnp.asarray(next(batches), jnp.float32) * scale
        lb, sb = solver.batch_loss(f, xb, code_iters, code_solver)
        loss, sq, rows = loss + float(lb), sq + float(sb), rows + xb.shape[0]
        s += np.asarray(jnp.sum(xb, axis=0), np.float64)
    return loss, sq, sq - float(s @ s) / max(rows, 1)


# ----------------------------------------------------------------------------------------------
# From a config table and a cache to a saved decomposer


def parse_table(table: dict[str, Any]) -> SNMFTrainConfig:
    from dictlearn.config import from_dict

    return from_dict(SNMFTrainConfig, dict(table), where=f"[[decomposers]] {table.get('name', '?')!r} (snmf)")


def train(specs: list[DecomposerSpec], source: BatchSource, cfg: Any, wandb_cfg: WandbConfig | None = None, *,
          log_dir: Path | None = None, mesh: Any = None,
          output_projection: Callable[[str], tuple[np.ndarray, str] | None] | None = None) -> TrainResult:
    """The trainer protocol for semi-NMF: solve each spec on `source` (its own view: one key, the spec's
    batch size) and save it. output_projection(hookpoint) gives (W_out (d_mlp, d_model), the hookpoint where
    hidden @ W_out appears) where the hookpoint is an MLP hidden site, so the saved dictionary also holds its
    residual directions."""
    result = TrainResult({}, {}, {})
    for spec in specs:
        options = spec.options if spec.options is not None else SNMFOptions()
        table = SNMFTrainConfig(name=spec.name, hookpoint_in=spec.config.hookpoint_in, n_features=spec.config.n_features,
                                encode_iters=spec.config.encode_iters, encode_solver=spec.config.encode_solver,
                                **dataclasses.asdict(options))
        view = source.view([spec.config.hookpoint_in], options.batch_size)
        w_out, resid_at = (output_projection(spec.config.hookpoint_in) if output_projection is not None else None) or (None, "")
        try:
            folder = train_snmf_from_source(table, view, spec.folder, w_out, spec.config.seed, resid_hookpoint=resid_at)
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise disk_full(spec.folder, f"saving the semi-NMF {spec.name!r}",
                            "(semi-NMF solves again from the start; the other decomposers keep their results).") from None
        result = result.merge(TrainResult({spec.name: base.load(folder)}, {spec.name: read_log(folder / LOG_FILE)},
                                          {spec.name: folder}))
    return result


def train_snmf_from_source(cfg: SNMFTrainConfig, source, out_folder: Path, w_out: np.ndarray | None, seed: int,
                           resid_hookpoint: str = "") -> Path:
    """Solve `cfg` on any trainers.data.BatchSource holding cfg.hookpoint_in; save to `out_folder`."""
    from dictlearn.trainers.scaling import input_scale

    key = cfg.hookpoint_in
    out_folder.mkdir(parents=True, exist_ok=True)
    log_path = out_folder / LOG_FILE
    log_path.unlink(missing_ok=True)  # semi-NMF does not resume: a new solve writes a new log
    n_rows = source.rows()
    if cfg.solver == "memory":
        x = np.asarray(source.sample(min(cfg.max_rows, n_rows))[key], np.float32)
        d = x.shape[1]
    else:
        x = np.asarray(source.sample(min(cfg.init_rows, n_rows))[key], np.float32)
        d = x.shape[1]
    k = cfg.n_features_for(d)
    if k > x.shape[0]:
        raise ValueError(f"{cfg.name}: K = {k} features need at least {k} rows in memory, got {x.shape[0]}")
    scale = input_scale(x) if cfg.scale_inputs else 1.0
    x *= scale
    logger = TrainLogger(out_folder, {cfg.name: log_path}, WandbConfig(mode="disabled"),
                         {**dataclasses.asdict(cfg), "decomposers": {cfg.name: {"kind": cfg.kind}}},
                         n_steps=cfg.max_iters if cfg.solver == "memory" else cfg.passes * (n_rows // source.batch_size),
                         start_step=0, progress=cfg.progress)
    total_sq = float(np.sum(np.square(x, dtype=np.float64)))
    centred_sq = total_sq - float(np.square(x.sum(0, dtype=np.float64)).sum()) / x.shape[0]
    fit_kwargs = dict(keep_fraction=cfg.keep_fraction, init=cfg.init, inner_steps=cfg.inner_steps,
                      refit_steps=cfg.refit_steps, reseed_every=cfg.reseed_every, tol=cfg.tol, chunk_iters=cfg.chunk_iters, seed=seed)
    failed = True
    try:
        if cfg.solver == "memory":
            def on_chunk(done: int, chunk: np.ndarray, best: float) -> None:
                for j, loss in enumerate(chunk):
                    step = done - len(chunk) + j
                    loss = float(loss)
                    logger.log(step, {cfg.name: {"loss": loss / total_sq, "fvu": loss / centred_sq,
                                                 "best_loss": best / total_sq}})
                logger.advance(len(chunk))

            res = fit_memory(x, k, max_iters=cfg.max_iters, patience=cfg.patience, on_chunk=on_chunk, **fit_kwargs)
            f = res.f
            summary = {"solver": "memory", "rows": int(x.shape[0]), "iterations": res.iters, "best_iter": res.best_iter,
                       "stopped": res.stopped, "loss": res.best_loss / total_sq, "fvu": res.best_loss / centred_sq,
                       "seconds": round(res.seconds, 3)}
        else:
            init = fit_memory(x, k, max_iters=cfg.init_iters, patience=cfg.init_iters, **fit_kwargs)
            per_pass = n_rows // source.batch_size
            if per_pass == 0:
                raise ValueError(f"{cfg.name}: the train split holds {n_rows} rows, fewer than one batch of {source.batch_size}")

            def on_batch(i: int, loss: float, sq: float) -> None:
                logger.log(i, {cfg.name: {"loss": loss / max(sq, 1e-30), "pass": i // per_pass}})
                logger.advance()

            batches = (b[key] for b in source.iterate(0))
            res = fit_streaming(batches, cfg.passes * per_pass, init.f, keep_fraction=cfg.keep_fraction,
                                refit_steps=cfg.refit_steps, reseed_every=cfg.reseed_every, forgetting=cfg.forgetting,
                                code_iters=cfg.code_iters, code_solver=cfg.code_solver, scale=scale,
                                init_rows=x, on_batch=on_batch)
            f = res.f
            loss, sq, centred = evaluate_loss(f, (b[key] for b in source.iterate(0)), per_pass,
                                              code_iters=cfg.encode_iters, code_solver=cfg.encode_solver, scale=scale)
            logger.log(res.batches, {cfg.name: {"eval_loss": loss / sq, "eval_fvu": loss / centred}})
            summary = {"solver": "streaming", "rows": per_pass * source.batch_size, "batches": res.batches,
                       "init_loss": init.best_loss / total_sq, "loss": loss / sq, "fvu": loss / centred,
                       "seconds": round(res.seconds + init.seconds, 3)}
        failed = False
    finally:
        logger.close(failed=failed)

    config = SNMFConfig(d_in=d, n_features=k, hookpoint_in=key, seed=seed, encode_iters=cfg.encode_iters,
                        encode_solver=cfg.encode_solver)
    module = base.build("snmf", config)
    assert isinstance(module, SemiNMF)
    module.set_features(f)
    module.fold_input_scale(scale, scale)  # codes scale with their input: F reads raw activations as is
    if w_out is not None:
        module.set_w_out(w_out, resid_hookpoint)
    logger.message(f"{cfg.name}: semi-NMF ({summary['solver']}) K={k}, loss {summary['loss']:.4f} of |X|^2, "
                   f"fvu {summary['fvu']:.4f}, {summary['seconds']:.1f} s")
    return base.save(module, out_folder, extra={"train": summary, "input_scale": scale, "table": dataclasses.asdict(cfg)})
