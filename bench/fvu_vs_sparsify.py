"""Held-out FVU of a dictlearn TopK SAE against EleutherAI sparsify, trained on the same tokens.

Both get the same training rows of one hookpoint from an activation cache, in the same order, with the
same hyper-parameters: width (expansion x d_in), k, batch size, Adam (lr, betas, eps), and sparsify's
learning-rate schedule (linear warm-up, then linear decay to 0). Each keeps its own initialisation and
conventions: dictlearn scales inputs to unit mean squared norm and folds the scale back at the end, as
its trainer does; sparsify trains on raw activations. Both are scored on the cache's held-out rows:
FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2.

The dictlearn side runs the decomposer protocol in the trainer's order (loss, project_grads, Adam,
after_step); sparsify runs in its own venv (see bench/train_throughput.py for the setup).

Usage: .venv/bin/python bench/fvu_vs_sparsify.py CACHE [--hookpoint resid_post.10] [--expansion 16] [--k 32]
       [--batch 1024] [--epochs 2] [--max-train-rows N] [--lr LR] [--encoder-init-norm R] [--no-scale] [--skip-sparsify]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def lr_schedule(step: int, total: int, warmup: int, lr: float) -> float:
    """transformers' get_linear_schedule_with_warmup (what sparsify's trainer uses)."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def batch_order(rows: int, batch: int, epochs: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        perm = rng.permutation(rows)
        out += [perm[i : i + batch] for i in range(0, rows - batch + 1, batch)]
    return out


def fvu(y: np.ndarray, y_hat: np.ndarray) -> float:
    y, y_hat = y.astype(np.float64), y_hat.astype(np.float64)
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


# ---- sparsify (runs inside its venv) ---------------------------------------------------------------


def run_sparsify(args) -> None:
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    train = np.load(args.train, mmap_mode="r")
    evalx = np.load(args.eval)
    d = train.shape[1]
    n = args.expansion * d
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=args.k), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    order = batch_order(train.shape[0], args.batch, args.epochs, args.seed)
    warmup = args.warmup
    since_fired = torch.zeros(n, dtype=torch.long)
    t0 = time.time()
    for step, idx in enumerate(order):
        x = torch.from_numpy(np.ascontiguousarray(train[np.sort(idx)]))
        if step == 0:
            sae.b_dec.data = x.mean(0)  # the trainer's first-step initialisation
        sae.set_decoder_norm_to_unit_norm()
        for g in opt.param_groups:
            g["lr"] = lr_schedule(step, len(order), warmup, args.lr)
        dead = since_fired > 10_000_000
        out = sae(x=x, y=x, dead_mask=dead, total_variance=(x - x.mean(0)).pow(2).sum())
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        fired = torch.zeros(n, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        since_fired.add_(x.shape[0])
        since_fired[fired] = 0
    sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        y_hat = torch.cat([sae(x=torch.from_numpy(c)).sae_out for c in np.array_split(evalx, max(1, len(evalx) // 2048))])
    print(json.dumps({"fvu": fvu(evalx, y_hat.numpy()), "seconds": time.time() - t0, "steps": len(order)}))


# ---- dictlearn ----------------------------------------------------------------------------------------


def run_dictlearn(train: np.ndarray, evalx: np.ndarray, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import dictlearn.decomposers as D

    d = train.shape[1]
    config = {"d_in": d, "n_features": args.expansion * d, "k": args.k, "seed": args.seed}
    if args.encoder_init_norm:
        config["encoder_init_norm"] = args.encoder_init_norm
    model = D.build("topk", config)
    order = batch_order(train.shape[0], args.batch, args.epochs, args.seed)
    sample = train[np.sort(order[0])]
    scale = float(1.0 / np.sqrt(np.mean(np.sum(sample.astype(np.float64) ** 2, axis=1)))) if args.scale_inputs else 1.0
    model.init_from_data(jnp.asarray(sample * scale), jnp.asarray(sample * scale))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, args.lr, args.warmup), optax.linear_schedule(args.lr, 0.0, len(order) - args.warmup)],
        [args.warmup])
    opt = nnx.Optimizer(model, optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8), wrt=nnx.Param)
    graph, state = nnx.split((model, opt))

    @jax.jit
    def step(state, x):
        model, opt = nnx.merge(graph, state)
        batch = {"x": x * scale, "y": x * scale}
        (loss, metrics), grads = model.loss_and_grads(batch)
        opt.update(model, model.project_grads(grads))
        model.after_step(metrics)
        return nnx.state((model, opt)), metrics["fvu"]

    step = jax.jit(step, donate_argnums=0)
    t0 = time.time()
    for idx in order:
        state, _ = step(state, jnp.asarray(train[np.sort(idx)]))
    nnx.update((model, opt), state)
    model.fold_input_scale(scale, scale)
    call = jax.jit(lambda x: model(x))
    y_hat = np.concatenate([np.asarray(call(jnp.asarray(c))) for c in np.array_split(evalx, max(1, len(evalx) // 2048))])
    return {"fvu": fvu(evalx, y_hat), "seconds": time.time() - t0, "steps": len(order)}


def load_rows(cache_path: str, hookpoint: str, split: str, max_rows: int | None) -> np.ndarray:
    from dictlearn.activations.cache import ActivationCache
    from dictlearn.activations.loader import BatchLoader

    cache = ActivationCache.open(cache_path)
    rows = cache.rows(split)
    if max_rows:
        rows = min(rows, max_rows)
    loader = BatchLoader(cache, [hookpoint], batch_size=rows, split=split, seed=0, prefetch=0)
    return np.ascontiguousarray(loader.batch(0)[hookpoint], dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache", nargs="?", help="activation cache folder (dictlearn harvest output)")
    ap.add_argument("--hookpoint", default="resid_post.10")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train-rows", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.0, help="0: sparsify's default, 2e-4 / sqrt(n_latents / 2**14)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (0: 10%% of the steps, at most 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scale", dest="scale_inputs", action="store_false",
                    help="dictlearn trains on raw activations, as sparsify does (default: unit mean squared norm, folded back)")
    ap.add_argument("--encoder-init-norm", type=float, default=0.0, help="dictlearn's encoder row norm at init (0: its default)")
    ap.add_argument("--skip-sparsify", action="store_true")
    ap.add_argument("--peer-venvs", default=os.environ.get("DICTLEARN_PEER_VENVS", "/work/peer-venvs"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--eval", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        run_sparsify(args)
        return 0
    if not args.cache:
        ap.error("give the activation cache folder")
    train = load_rows(args.cache, args.hookpoint, "train", args.max_train_rows)
    evalx = load_rows(args.cache, args.hookpoint, "eval", None)
    d = train.shape[1]
    n = args.expansion * d
    args.lr = args.lr or 2e-4 / (n / 2**14) ** 0.5
    steps = args.epochs * (train.shape[0] // args.batch)
    args.warmup = args.warmup or min(1000, steps // 10)
    print(f"{args.hookpoint}: {train.shape[0]:,} training rows, {evalx.shape[0]:,} held-out rows, d_in {d}, "
          f"{n} latents, k {args.k}, batch {args.batch}, {steps} steps, lr {args.lr:.2e}, warm-up {args.warmup}", flush=True)
    results = {"dictlearn": run_dictlearn(train, evalx, args)}
    print(f"  dictlearn  FVU {results['dictlearn']['fvu']:.4f}  ({results['dictlearn']['seconds']:.0f} s)", flush=True)
    exe = Path(args.peer_venvs) / "sparsify" / "bin" / "python"
    if not args.skip_sparsify and not exe.is_file():
        print(f"  sparsify   skipped: no venv at {exe.parent.parent} (see bench/train_throughput.py)")
    elif not args.skip_sparsify:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "train.npy", train)
            np.save(Path(tmp) / "eval.npy", evalx)
            cmd = [str(exe), __file__, "--worker", "--train", str(Path(tmp) / "train.npy"), "--eval",
                   str(Path(tmp) / "eval.npy"), "--expansion", str(args.expansion), "--k", str(args.k),
                   "--batch", str(args.batch), "--epochs", str(args.epochs), "--lr", str(args.lr),
                   "--warmup", str(args.warmup), "--seed", str(args.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
            if proc.returncode != 0:
                raise RuntimeError(f"sparsify worker failed:\n{proc.stderr[-3000:]}")
            results["sparsify"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  sparsify   FVU {results['sparsify']['fvu']:.4f}  ({results['sparsify']['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
