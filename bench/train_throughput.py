"""TopK SAE train-step throughput: dictlearn against EleutherAI sparsify and SAELens, side by side.

One float32 batch (default 4096 rows, k 32) per size; for each size, in rounds so that machine noise
hits every system alike:
  dictlearn   the full TopK step (loss, gradients, decoder-gradient projection, Adam, renormalisation),
              jitted with donated state, in this process (with the C++ CPU kernels of dictlearn/kernels;
              --also-xla adds the same step on XLA's ops alone, "dictlearn-xla")
  sparsify    SparseCoder forward / backward / Adam step as its trainer runs it   (peer venv, subprocess)
  sae-lens    TopKTrainingSAE with its defaults, Adam step as its trainer runs it (peer venv, subprocess)
  matmul      the float32 (batch x d) @ (d x n) rate (numpy and JAX here, torch in the peer), giving the
              step's limit: tokens/s = best rate / (2 d n + 8 k d) FLOPs per token
Reported: median tokens/s per system (with the fastest step and the IQR, the run's noise), and the
ratios both from medians and from each system's fastest step.

Peers live in their own virtual environments (the project's stays untouched):
  python3 -m venv /work/peer-venvs/sparsify && /work/peer-venvs/sparsify/bin/pip install torch==2.13.0 eai-sparsify
  python3 -m venv /work/peer-venvs/saelens  && /work/peer-venvs/saelens/bin/pip install torch==2.13.0 sae-lens

Usage:  .venv/bin/python bench/train_throughput.py [--sizes 768x16384,576x9216] [--rounds 3] [--steps 4]
        [--profile DIR]  (also prints where dictlearn's step spends its time, op by op)
The same file is the peers' worker (`--worker sparsify|saelens`); its top level imports only numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEERS = {"sparsify": "sparsify", "saelens": "saelens"}  # worker name -> venv folder name


def make_batch(batch: int, d: int, seed: int = 0) -> np.ndarray:
    """Correlated Gaussian activations scaled to unit mean squared norm (what the trainer feeds)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
    x = rng.standard_normal((batch, d)).astype(np.float32) @ mix + 0.3 * rng.standard_normal(d).astype(np.float32)
    return (x / np.sqrt(np.mean(np.sum(x**2, axis=1)))).astype(np.float32)


def timed(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---- workers (run inside a peer venv: torch only) ------------------------------------------------


def worker_sparsify(x, n_latents: int, k: int, device: str = "cpu"):
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    xt = torch.from_numpy(x).to(device)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=n_latents, k=k), device=device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n_latents / 2**14) ** 0.5)  # its trainer's default lr
    since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
    sae.b_dec.data = xt.mean(0)

    def step():
        # The trainer's sequence for one batch (loss_fn "fvu", auxk_alpha 1/32 as in the paper).
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > 10_000_000
        total_variance = (xt - xt.mean(0)).pow(2).sum()
        out = sae(x=xt, y=xt, dead_mask=dead, total_variance=total_variance)
        did_fire = torch.zeros(n_latents, dtype=torch.bool, device=device)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired.add_(xt.shape[0])
        since_fired[did_fire] = 0
        float(out.fvu)

    return step


def worker_saelens(x, n_latents: int, k: int):
    import torch
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    xt = torch.from_numpy(x)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=n_latents, k=k, dtype="float32", device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))  # SAELens defaults
    since_fired = torch.zeros(n_latents)
    state = {"step": 0}

    def step():
        # SAETrainer._train_step: forward, firing bookkeeping, backward, clip, Adam.
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=xt, coefficients={}, dead_neuron_mask=(since_fired > 1000).bool(),
            n_training_steps=state["step"], is_logging_step=False))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1
        float(out.loss)

    return step


def torch_matmul_rate(x: np.ndarray, n: int, reps: int = 3) -> float:
    import torch

    a = torch.from_numpy(x)
    w = torch.randn(x.shape[1], n)
    times = timed(lambda: a @ w, reps, 1)
    return 2 * x.shape[0] * x.shape[1] * n / min(times)


def run_worker(args) -> None:
    x = np.load(args.data)
    step = {"sparsify": worker_sparsify, "saelens": worker_saelens}[args.worker](x, args.n_latents, args.k)
    times = timed(step, args.steps, args.warmup)
    rate = torch_matmul_rate(x, args.n_latents)
    print(json.dumps({"times": times, "torch_matmul_flops": rate}))


# ---- dictlearn (this process) ----------------------------------------------------------------------


def dictlearn_step(x: np.ndarray, n_latents: int, k: int):
    """The trainer's step for one TopK SAE: loss, grads, project, Adam, after_step; donated state."""
    import jax
    import optax
    from flax import nnx

    import dictlearn.decomposers as D

    model = D.build("topk", {"d_in": x.shape[1], "n_features": n_latents, "k": k})
    xj = jax.device_put(x)
    model.init_from_data(xj, xj)
    opt = nnx.Optimizer(model, optax.adam(2e-4 / (n_latents / 2**14) ** 0.5), wrt=nnx.Param)
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(opt)

    def step(states, batch):
        model = nnx.merge(model_def, states[0])
        opt = nnx.merge(opt_def, states[1])
        (loss, metrics), grads = model.loss_and_grads(batch)
        opt.update(model, model.project_grads(grads))
        model.after_step(metrics)
        return (nnx.state(model), nnx.state(opt)), loss

    step = jax.jit(step, donate_argnums=0)
    holder = {"states": (model_state, opt_state)}
    batch = {"x": xj, "y": xj}

    def run():
        holder["states"], loss = step(holder["states"], batch)
        loss.block_until_ready()

    return run


def matmul_rates(x: np.ndarray, n: int, reps: int = 3) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    flops = 2 * x.shape[0] * x.shape[1] * n
    w = np.random.default_rng(1).standard_normal((x.shape[1], n)).astype(np.float32)
    np_t = timed(lambda: x @ w, reps, 1)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    mm = jax.jit(lambda a, b: a @ b)
    jx_t = timed(lambda: mm(xj, wj).block_until_ready(), reps, 1)
    return {"numpy": flops / min(np_t), "jax": flops / min(jx_t)}


def peer_python(venvs: Path, name: str) -> Path | None:
    exe = venvs / PEERS[name] / "bin" / "python"
    return exe if exe.is_file() else None


def run_peer(exe: Path, name: str, data: Path, n: int, k: int, steps: int, warmup: int) -> dict:
    cmd = [str(exe), __file__, "--worker", name, "--data", str(data), "--n-latents", str(n), "--k", str(k),
           "--steps", str(steps), "--warmup", str(warmup)]
    env = {**os.environ, "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} worker failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_profile(run, folder: Path, steps: int, top: int = 12) -> None:
    """Trace `steps` dictlearn steps with jax.profiler and print the costliest XLA ops per step (the
    per-op events need XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true, which --profile sets)."""
    import gzip
    from collections import Counter

    import jax

    jax.profiler.start_trace(str(folder))
    for _ in range(steps):
        run()
    jax.profiler.stop_trace()
    trace = max(folder.rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    ms = Counter()
    for e in json.load(gzip.open(trace))["traceEvents"]:
        if e.get("ph") == "X" and not e["name"].startswith(("ThunkExecutor", "$")):
            ms[e["name"]] += e.get("dur", 0) / 1e3 / steps
    print(f"  dictlearn step, costliest XLA ops (ms per step; trace in {folder}):")
    for name, t in ms.most_common(top):
        print(f"    {t:8.1f}  {name}")


def summary(times: list[float], batch: int) -> dict[str, float]:
    med = statistics.median(times)
    q = np.percentile(times, [25, 75])
    return {"tokens_per_s": batch / med, "step_s": med, "min_s": min(times), "iqr_s": float(q[1] - q[0]),
            "n": len(times)}


def bench_size(d: int, n: int, args, venvs: Path, tmp: Path) -> dict:
    x = make_batch(args.batch, d)
    data = tmp / f"batch_{d}.npy"
    np.save(data, x)
    times: dict[str, list[float]] = {"dictlearn": []}
    rates: dict[str, list[float]] = {"numpy": [], "jax": [], "torch": []}
    peers = [p for p in args.peers if peer_python(venvs, p)]
    for p in set(args.peers) - set(peers):
        print(f"  ! {p}: no venv at {venvs / PEERS[p]}; skipped (see this file's docstring)", file=sys.stderr)
    run = dictlearn_step(x, n, args.k)
    runs = {"dictlearn": run}
    if args.also_xla:
        times["dictlearn-xla"] = []
        os.environ["DICTLEARN_CPU_KERNELS"] = "0"  # read when the step is traced, at its first call
        try:
            runs["dictlearn-xla"] = dictlearn_step(x, n, args.k)
            runs["dictlearn-xla"]()
        finally:
            del os.environ["DICTLEARN_CPU_KERNELS"]
    for r in range(args.rounds):
        for name, fn in runs.items():
            times[name] += timed(fn, args.steps, args.warmup if r == 0 else 1)
        for p in peers:
            out = run_peer(peer_python(venvs, p), p, data, n, args.k, args.steps, args.warmup)
            times.setdefault(p, []).extend(out["times"])
            rates["torch"].append(out["torch_matmul_flops"])
        for key, v in matmul_rates(x, n).items():
            rates[key].append(v)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{s} {args.batch / statistics.median(t):,.0f} tok/s" for s, t in times.items()), flush=True)
    if args.profile:
        print_profile(run, Path(args.profile) / f"{d}x{n}", args.steps)
    best = {key: max(v) for key, v in rates.items() if v}
    flops_per_token = 2 * d * n + 8 * args.k * d
    limit = max(best.values()) / flops_per_token
    res = {"d_in": d, "n_latents": n, "batch": args.batch, "k": args.k,
           "systems": {s: summary(t, args.batch) for s, t in times.items()},
           "matmul_gflops": {key: v / 1e9 for key, v in best.items()}, "limit_tokens_per_s": limit}
    dl = res["systems"]["dictlearn"]
    res["dictlearn_vs_limit"] = dl["tokens_per_s"] / limit
    res["dictlearn_best_vs_limit"] = args.batch / dl["min_s"] / limit  # fastest step against the best matmul
    if "dictlearn-xla" in res["systems"]:
        res["kernels_speedup"] = dl["tokens_per_s"] / res["systems"]["dictlearn-xla"]["tokens_per_s"]
    for p in peers:
        res[f"dictlearn_vs_{p}"] = dl["tokens_per_s"] / res["systems"][p]["tokens_per_s"]
        res[f"dictlearn_vs_{p}_best"] = res["systems"][p]["min_s"] / dl["min_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="768x16384,576x9216", help="d_in x latents, comma separated")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per system per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds alternating the systems (for noise)")
    ap.add_argument("--peers", default="sparsify,saelens", help="comma separated; '' for none")
    ap.add_argument("--peer-venvs", default=os.environ.get("DICTLEARN_PEER_VENVS", "/work/peer-venvs"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--also-xla", action="store_true", help="also time dictlearn's step without its CPU kernels")
    ap.add_argument("--profile", help="also trace dictlearn's step into this folder and print its costliest XLA ops")
    ap.add_argument("--worker", choices=sorted(PEERS), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--n-latents", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.profile:  # before JAX starts (it is imported lazily): per-op trace events on CPU
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    args.peers = [p for p in args.peers.split(",") if p]
    bad = [p for p in args.peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peer(s) {bad}; known: {sorted(PEERS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            d, n = (int(v) for v in size.lower().split("x"))
            print(f"d_in {d}, {n} latents, batch {args.batch}, k {args.k}, float32:", flush=True)
            res = bench_size(d, n, args, Path(args.peer_venvs), Path(tmp))
            results.append(res)
            for s, v in res["systems"].items():
                print(f"  {s:10s} {v['tokens_per_s']:9,.0f} tokens/s  (median step {v['step_s']:.3f} s, "
                      f"min {v['min_s']:.3f}, IQR {v['iqr_s']:.3f}, n={v['n']})")
            g = res["matmul_gflops"]
            print("  matmul     " + ", ".join(f"{key} {v:.0f}" for key, v in g.items()) + " GFLOP/s (best of runs)")
            print(f"  limit      {res['limit_tokens_per_s']:9,.0f} tokens/s (best matmul rate / (2 d n + 8 k d))")
            print(f"  dictlearn (median steps) = {res['dictlearn_vs_limit']:.0%} of the limit" + "".join(
                f", {res[f'dictlearn_vs_{p}']:.2f}x {p}" for p in PEERS if f"dictlearn_vs_{p}" in res))
            print(f"  dictlearn (fastest steps) = {res['dictlearn_best_vs_limit']:.0%} of the limit" + "".join(
                f", {res[f'dictlearn_vs_{p}_best']:.2f}x {p}" for p in PEERS if f"dictlearn_vs_{p}_best" in res))
            if "kernels_speedup" in res:
                print(f"  dictlearn's CPU kernels: {res['kernels_speedup']:.2f}x its step on XLA's ops alone (medians)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
