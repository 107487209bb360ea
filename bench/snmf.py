"""Semi-NMF speed: the paper's loop transcribed to numpy vs dictlearn's solvers, on real activations.

    python bench/snmf.py CACHE_DIR [--key mlp_hidden.10] [--rows 100000] [--k 100] [--baseline-iters 500]

CACHE_DIR is a dictlearn activation cache (or a .npy file of (rows, d_mlp) float32 activations).
1. baseline: a straightforward float32 numpy transcription of the reference code with its defaults
   (random init, F by least squares, winner-take-all 1%, unit code columns, multiplicative G update,
   dense ||A - F G^T||^2 every iteration, best kept) runs `--baseline-iters` iterations: its time and
   final (best) loss L*. Per-phase times are recorded.
2. dictlearn's in-memory solver runs until it reaches L*: with its defaults, and with its parts
   switched on one at a time (init, support refit, inner G steps, reseeding) to say which gives what;
   plus the paper's algorithm itself in JAX for a per-iteration time.
3. the streaming solver with its defaults: time and final loss (codes solved for every row).
`--baseline-json FILE` reuses a baseline measured before (the slow part); `--out FILE` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_rows(path: str, key: str, rows: int) -> np.ndarray:
    if path.endswith(".npy"):
        x = np.load(path, mmap_mode="r")
        return np.ascontiguousarray(x[:rows], dtype=np.float32)
    from dictlearn.activations.cache import ActivationCache
    from dictlearn.activations.loader import BatchLoader

    cache = ActivationCache.open(path)
    if key not in cache.hookpoints:
        raise SystemExit(f"{path} has no hookpoint {key!r}; it holds {', '.join(cache.hookpoints)}")
    n = min(rows, int(cache.rows("all")))
    if n < rows:
        print(f"note: the cache holds {n} rows, fewer than the {rows} asked for", flush=True)
    return np.ascontiguousarray(BatchLoader(cache, [key], batch_size=n, split="all", seed=0).batch(0)[key], np.float32)


def paper_numpy(a: np.ndarray, k: int, iters: int, keep_fraction: float = 0.01, reg: float = 1e-6,
                eps: float = 1e-12, tol: float = 1e-4, seed: int = 0) -> dict:
    """The reference loop, float32 numpy, A (d, n). Returns losses, best loss, per-phase seconds."""
    d, n = a.shape
    rng = np.random.default_rng(seed)
    g = np.maximum(rng.random((n, k), dtype=np.float32), np.float32(1e-6))
    keep = max(1, math.ceil(keep_fraction * d))
    eye = np.eye(k, dtype=np.float32) * np.float32(reg)
    phases = {"f_update": 0.0, "sparsify": 0.0, "normalize": 0.0, "g_update": 0.0, "loss": 0.0}
    losses, iter_times, best = [], [], math.inf
    t_start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        f = a @ g @ np.linalg.inv(g.T @ g + eye)
        t1 = time.perf_counter()
        mag = np.abs(f)
        thresh = np.partition(mag, d - keep, axis=0)[d - keep]
        f *= mag >= thresh
        t2 = time.perf_counter()
        norms = np.maximum(np.linalg.norm(g, axis=0), np.float32(1e-8))
        g /= norms
        f *= norms
        t3 = time.perf_counter()
        p, q = a.T @ f, f.T @ f
        p_pos, p_neg = (np.abs(p) + p) / 2, (np.abs(p) - p) / 2
        q_pos, q_neg = (np.abs(q) + q) / 2, (np.abs(q) - q) / 2
        g *= np.sqrt((p_pos + g @ q_neg) / (p_neg + g @ q_pos + np.float32(eps)))
        t4 = time.perf_counter()
        loss = float(np.linalg.norm(a - f @ g.T) ** 2)
        t5 = time.perf_counter()
        if loss < best - tol:
            best = loss
        losses.append(loss)
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            phases[name] += dt
        iter_times.append(t5 - t0)
    return {"seconds": time.perf_counter() - t_start, "best_loss": best, "final_loss": losses[-1], "losses": losses,
            "phases": phases, "median_iter_seconds": statistics.median(iter_times), "iters": iters}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="activation cache folder, or a .npy of (rows, d_mlp) activations")
    ap.add_argument("--key", default="mlp_hidden.10")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--baseline-iters", type=int, default=500)
    ap.add_argument("--baseline-json", help="reuse the baseline from a JSON this script wrote")
    ap.add_argument("--max-iters", type=int, default=500, help="cap for the dictlearn defaults run")
    ap.add_argument("--ablation-max-iters", type=int, default=150, help="cap for each ablation run")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--converge", action="store_true", help="also run the in-memory defaults until patience stops them")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from dictlearn.trainers import snmf as trainer

    x = load_rows(args.data, args.key, args.rows)
    n, d = x.shape
    print(f"data: {n} rows x {d} (key {args.key}), K = {args.k}, jax {jax.__version__} on {jax.devices()[0].platform}",
          flush=True)
    results: dict = {"rows": n, "d": d, "k": args.k, "data": args.data}

    # 1. the baseline
    if args.baseline_json:
        base = json.loads(Path(args.baseline_json).read_text())["baseline"]
        if (base.get("rows"), base.get("k")) != (n, args.k):
            raise SystemExit(f"{args.baseline_json} was measured on {base.get('rows')} rows, K={base.get('k')}")
        print("baseline: reused from", args.baseline_json, flush=True)
    else:
        print(f"baseline: numpy transcription of the paper's loop, {args.baseline_iters} iterations ...", flush=True)
        base = paper_numpy(np.ascontiguousarray(x.T), args.k, args.baseline_iters)
        base.update(rows=n, k=args.k)
    results["baseline"] = base
    target = base["best_loss"]
    sq = float(np.sum(np.square(x, dtype=np.float64)))
    print(f"baseline: {base['seconds']:.1f} s for {base['iters']} iterations "
          f"(median {base['median_iter_seconds']:.2f} s/iter; phases {', '.join(f'{k} {v:.0f}s' for k, v in base['phases'].items())}); "
          f"best loss {target:.6g} = {target / sq:.4f} of |X|^2", flush=True)

    # dictlearn works on x scaled to unit mean squared norm (as its trainer does); losses scale by s^2
    s = 1.0 / math.sqrt(sq / n)
    xs = jnp.asarray(x * s)
    target_s = target * s * s

    def run(label: str, max_iters: int | None = None, **kw) -> dict:
        max_iters = max_iters or args.ablation_max_iters
        t0 = time.perf_counter()
        res = trainer.fit_memory(xs, args.k, max_iters=max_iters, patience=max_iters, tol=0.0, target_loss=target_s, **kw)
        wall = time.perf_counter() - t0
        out = {"seconds": wall, "init_seconds": res.init_seconds, "iters": res.iters, "reached": res.stopped == "target",
               "best_loss": res.best_loss / (s * s), "rel_loss": res.best_loss / (s * s) / sq}
        print(f"{label:44s} {wall:8.1f} s  {res.iters:4d} iters  init {res.init_seconds:6.1f} s  "
              f"loss {out['rel_loss']:.4f}  {'reached' if out['reached'] else 'NOT reached'}  "
              f"speed-up x{base['seconds'] / wall:.1f}", flush=True)
        fs[label] = res.f
        return out

    runs, fs = {}, {}
    runs["defaults"] = run("dictlearn defaults (svd+refit+inner5+reseed)", max_iters=args.max_iters)
    fs["defaults"] = fs.pop("dictlearn defaults (svd+refit+inner5+reseed)")
    if not args.skip_ablation:
        # the paper's algorithm itself in JAX: per-iteration cost of fused chunks and the cheap loss
        t0 = time.perf_counter()
        paper_iters = 20
        res = trainer.fit_memory(xs, args.k, init="random", inner_steps=1, refit_steps=0, reseed_every=0,
                                 max_iters=paper_iters, patience=paper_iters, tol=0.0, chunk_iters=paper_iters)
        wall = time.perf_counter() - t0
        runs["paper_in_jax_per_iter"] = {"seconds_per_iter": (wall - res.init_seconds) / paper_iters,
                                         "note": "first dispatch includes the jit compile"}
        print(f"{'paper algorithm in JAX (per iteration)':44s} {runs['paper_in_jax_per_iter']['seconds_per_iter']:8.2f} s/iter "
              f"(numpy: {base['median_iter_seconds']:.2f}, of which dense loss {base['phases']['loss'] / base['iters']:.2f})",
              flush=True)
        paper = dict(inner_steps=1, refit_steps=0, reseed_every=0)
        runs["svd_only"] = run("+ svd init", init="svd", **paper)
        runs["svd_refit"] = run("+ svd init + refit", init="svd", inner_steps=1, reseed_every=0)
        runs["svd_refit_inner"] = run("+ svd init + refit + inner5", init="svd", reseed_every=0)
        runs["random_refit_inner_reseed"] = run("defaults with random init", init="random")
        runs["kmeans_refit_inner_reseed"] = run("defaults with kmeans init", init="kmeans")
    results["memory"] = runs

    # 3. streaming with its defaults, through the trainer (init on a sample, passes, final evaluation)
    import tempfile

    from dictlearn.decomposers import base as dbase
    from dictlearn.trainers.data import ArraySource

    cfg = trainer.SNMFTrainConfig(name="bench", hookpoint_in=args.key, n_features=args.k, solver="streaming",
                                  progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = trainer.train_snmf_from_source(cfg, ArraySource({args.key: x}, cfg.batch_size, seed=0), Path(tmp) / "s",
                                                None, seed=0)
        train_wall = time.perf_counter() - t0
        summary = json.loads((folder / "config.json").read_text())["extra"]["train"]
        stream_f = dbase.load(folder).F[...]
    n_eval = max(1, n // 8192)

    def evaluate(f) -> float:
        loss, sq_s, _ = trainer.evaluate_loss(f, iter(np.array_split(x, n_eval)), n_eval, code_iters=cfg.encode_iters, scale=s)
        return loss / sq_s

    stream_rel, mem_rel = evaluate(stream_f), evaluate(fs["defaults"])
    train_seconds = summary["seconds"]
    results["streaming"] = {"seconds": train_seconds, "wall_with_eval_pass": train_wall, "rel_loss": stream_rel,
                            "loss": stream_rel * sq,
                            "memory_defaults_rel_loss_same_eval": mem_rel, "passes": cfg.passes, "batch_size": cfg.batch_size}
    print(f"{'streaming defaults (3 passes, batch 4096)':44s} {train_seconds:8.1f} s  loss {stream_rel:.4f} "
          f"(in-memory defaults' F, same evaluation: {mem_rel:.4f}; baseline {target / sq:.4f})", flush=True)
    if args.converge:
        res = trainer.fit_memory(xs, args.k, max_iters=args.max_iters)
        results["memory"]["defaults_converged"] = {"iters": res.iters, "seconds": res.seconds, "stopped": res.stopped,
                                                   "rel_loss_same_eval": evaluate(res.f)}
        print(f"{'in-memory defaults to convergence':44s} {res.seconds:8.1f} s  {res.iters:4d} iters ({res.stopped}), "
              f"loss {results['memory']['defaults_converged']['rel_loss_same_eval']:.4f}", flush=True)

    ratio = base["seconds"] / runs["defaults"]["seconds"]
    print(f"\nheadline: baseline {base['seconds']:.1f} s -> dictlearn {runs['defaults']['seconds']:.1f} s to the same loss: x{ratio:.1f}")
    results["speedup"] = ratio
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
