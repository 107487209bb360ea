"""Matryoshka SAE: train-step throughput against BatchTopK, and prefix quality on a real SmolLM2 cache.

  throughput  The trainer's full step (loss, gradients, decoder-gradient projection, Adam, after_step;
              jitted, donated state) for a Matryoshka SAE and a BatchTopK SAE of the same width, k and
              batch, timed in alternating rounds so machine noise hits both alike. Prints median step
              times and the ratio by medians, fastest steps and CPU time per step (issue 15 asks for at
              most 1.3x).
  smollm2     Harvests a small SmolLM2-135M-Instruct cache (resid_post.L) with the library API, trains a
              Matryoshka SAE and a BatchTopK SAE of the same width and k on it with the SGD trainer, and
              reports held-out FVU and L0 of each prefix, and the next-token CE with each prefix's
              reconstruction spliced into the model (and the BatchTopK SAE's for comparison).

Usage:
  .venv/bin/python bench/matryoshka.py throughput [--sizes 576x4608,768x16384] [--batch 4096] [--k 32]
  .venv/bin/python bench/matryoshka.py smollm2 [--layer 10] [--tokens 131072] [--expansion 4] [--k 32] [--steps 600]

Measured 2026-12-03 on the shared 2-core machine (absolute times are noisy; the two kinds alternate):
  throughput (defaults: rounds 3, steps 4), on the row-selecting CPU kernels, load average 6 to 10:
    576x4608: BatchTopK median 1.98 s, Matryoshka (4 prefixes) 1.62 s: 0.82x (fastest steps 0.98x, CPU time
    per step 0.83x); 768x16384: 4.68 s vs 4.28 s: 0.92x (0.91x, 0.86x). Target <= 1.3x. A second run (load 4
    to 7): 0.98x (2.37x: BatchTopK's fastest step fell in a quiet moment; 0.82x) and 0.85x (1.08x, 0.86x);
    --sizes 576x4608 --rounds 8 --steps 2: 0.94x (1.15x, 0.90x).
  Before those kernels (the grouped decode on XLA's gathers): 1.60x at 576x4608 (load 1.5 to 4) and 1.77x at
    768x16384. docs/kernels.md says what changed and why Matryoshka now comes out below BatchTopK.
  smollm2 --steps 500 (resid_post.10, 2304 latents, k 32, 117,505 train / 13,282 held-out tokens; CE on 4,055
  tokens, clean 3.514, zero-ablated 11.109):
    prefix | Matryoshka FVU  L0    CE   CE score | BatchTopK first-w FVU  L0    CE    CE score
        36 |          0.582  9.9  5.712  0.711   |                 1.001  0.6  11.266  -0.021
       144 |          0.362 20.5  4.472  0.874   |                 0.939  2.0  10.743   0.048
       576 |          0.242 27.4  3.875  0.952   |                 0.717  7.7   6.899   0.554
      2304 |          0.185 31.4  3.669  0.980   |                 0.163 30.4   3.640   0.983
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import make_batch, summary, timed  # noqa: E402  (same batch and timing as the TopK bench)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


# ---- throughput ---------------------------------------------------------------------------------------


def train_step(x: np.ndarray, kind: str, config: dict):
    """The SGD trainer's step for one decomposer, jitted with donated state: run() does one step."""
    import jax
    import optax
    from flax import nnx

    import dictlearn.decomposers as D

    model = D.build(kind, {"d_in": x.shape[1], **config})
    xj = jax.device_put(x)
    model.init_from_data(xj, xj)
    opt = nnx.Optimizer(model, optax.adam(2e-4), wrt=nnx.Param)
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(opt)

    def step(states, batch):
        model, opt = nnx.merge(model_def, states[0]), nnx.merge(opt_def, states[1])
        (loss, metrics), grads = model.loss_and_grads(batch)
        opt.update(model, model.project_grads(grads))
        model.after_step(metrics)
        return (nnx.state(model), nnx.state(opt)), (loss, metrics["dense_fallback"])

    step = jax.jit(step, donate_argnums=0)
    holder = {"states": (model_state, opt_state), "fallbacks": 0.0}
    batch = {"x": xj, "y": xj}

    def run():
        holder["states"], (loss, fallback) = step(holder["states"], batch)
        loss.block_until_ready()
        holder["fallbacks"] += float(fallback)

    run.holder = holder
    return run


def throughput(args) -> int:
    for size in args.sizes.split(","):
        d, n = (int(v) for v in size.lower().split("x"))
        x = make_batch(args.batch, d)
        widths = [w for w in (n // 64, n // 16, n // 4) if w >= 1] + [n]
        runs = {"batchtopk": train_step(x, "batchtopk", {"n_features": n, "k": args.k}),
                "matryoshka": train_step(x, "matryoshka", {"n_features": n, "k": args.k, "prefix_widths": widths})}
        times: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}  # process CPU seconds per step, rounds after the first
        print(f"d_in {d}, {n} latents, batch {args.batch}, k {args.k}, prefixes {widths}, float32:", flush=True)
        for r in range(args.rounds):
            for name, fn in runs.items():
                c0 = time.process_time()
                times[name] += timed(fn, args.steps, args.warmup if r == 0 else 1)
                if r > 0:  # the first round's warm-up holds the compilation
                    cpu[name].append((time.process_time() - c0) / (args.steps + 1))
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{name} {statistics.median(t):.3f} s" for name, t in times.items()), flush=True)
        stats = {name: summary(t, args.batch) for name, t in times.items()}
        for name, s in stats.items():
            print(f"  {name:10s} median step {s['step_s']:.3f} s (min {s['min_s']:.3f}, IQR {s['iqr_s']:.3f}, "
                  f"n={s['n']}), {s['tokens_per_s']:,.0f} tokens/s, dense fallbacks {runs[name].holder['fallbacks']:.0f}")
        ratio = stats["matryoshka"]["step_s"] / stats["batchtopk"]["step_s"]
        best = stats["matryoshka"]["min_s"] / stats["batchtopk"]["min_s"]
        by_cpu = (f", {statistics.median(cpu['matryoshka']) / statistics.median(cpu['batchtopk']):.2f}x (CPU time per "
                  f"step, less sensitive to other jobs)" if args.rounds > 1 else "")
        print(f"  matryoshka / batchtopk step time: {ratio:.2f}x (medians), {best:.2f}x (fastest steps){by_cpu}; "
              f"target <= 1.3x", flush=True)
    return 0


# ---- SmolLM2 prefixes ----------------------------------------------------------------------------------


def heldout_prefix_stats(model, x: np.ndarray, widths: list[int], chunk: int = 2048) -> dict[int, tuple[float, float]]:
    """{width: (FVU, L0)} on raw held-out rows: codes of the first `width` latents decoded with b_dec."""
    import jax.numpy as jnp

    w_dec, b_dec = np.asarray(model.W_dec[...]), np.asarray(model.b_dec[...])
    err = {w: 0.0 for w in widths}
    l0 = {w: 0.0 for w in widths}
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        codes = np.asarray(model.encode(jnp.asarray(xb)))
        for w in widths:
            err[w] += float(np.sum((xb - codes[:, :w] @ w_dec[:w] - b_dec) ** 2))
            l0[w] += float(np.sum(codes[:, :w] != 0))
    total = float(np.sum((x - x.mean(0)) ** 2))
    return {w: (err[w] / total, l0[w] / len(x)) for w in widths}


def smollm2(args) -> int:
    from dictlearn.activations.cache import ActivationCache
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest
    from dictlearn.activations.models import load_model
    from dictlearn.decomposers import base
    from dictlearn.decomposers.matryoshka import first_latents
    from dictlearn.eval.downstream import evaluate_downstream
    from dictlearn.trainers.data import CacheSource
    from dictlearn.trainers.sgd import TrainConfig, train
    from dictlearn.trainers.spec import DecomposerSpec, data_keys

    hookpoint = f"resid_post.{args.layer}"
    work = Path(args.out or tempfile.mkdtemp(prefix="matryoshka_bench_"))
    loaded = load_model(str(ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    cache_dir = work / "cache"
    if (cache_dir / "manifest.json").is_file():
        cache = ActivationCache.open(cache_dir)
    else:
        corpus = CorpusConfig(path=str(ASSETS / "english-corpus.jsonl.gz"), context_length=128)
        cache = harvest(loaded, corpus, HarvestConfig(hookpoints=[hookpoint], n_tokens=args.tokens, shard_mb=16,
                                                      eval_fraction=0.125), cache_dir, progress=False)
    d = cache.hookpoints[hookpoint]["width"]
    n = args.expansion * d
    widths = [w for w in (n // 64, n // 16, n // 4) if w >= 1] + [n]
    common = {"d_in": d, "n_features": n, "k": args.k, "hookpoint_in": hookpoint}
    specs = [DecomposerSpec("batchtopk", "batchtopk", base.REGISTRY["batchtopk"].config_cls(**common), work / "batchtopk"),
             DecomposerSpec("matryoshka", "matryoshka",
                            base.REGISTRY["matryoshka"].config_cls(**common, prefix_widths=widths), work / "matryoshka")]
    cfg = TrainConfig(batch_size=args.batch, n_steps=args.steps, lr=args.lr, warmup_steps=args.steps // 10,
                      progress=False, log_every=max(args.steps // 5, 1), checkpoint_every=args.steps, sample_tokens=8192)
    result = train(specs, CacheSource(cache, data_keys(specs), args.batch), cfg)
    held = np.concatenate([np.asarray(cache.shard_arrays(i, [hookpoint])[hookpoint], np.float32)
                           for i in cache.shard_ids("eval")])
    models = {name: base.load(folder) for name, folder in result.folders.items()}
    print(f"SmolLM2-135M-Instruct {hookpoint}: {cache.rows('train'):,} train / {len(held):,} held-out tokens; "
          f"{n} latents, k {args.k}, {args.steps} steps of {args.batch}")
    stats = {name: heldout_prefix_stats(m, held, widths) for name, m in models.items()}
    spliced = {f"matryoshka[:{w}]": models["matryoshka"].prefix(w) for w in widths}
    # A BatchTopK SAE's first w latents (its order is arbitrary): the contrast to Matryoshka's prefixes.
    spliced.update({f"batchtopk[:{w}]": first_latents(models["batchtopk"], w) for w in widths})
    seqs = cache.sequence_tokens(cache.eval_sequences()[: args.ce_sequences])
    ce = evaluate_downstream(loaded.model, seqs, spliced, excluded_token_ids=cache.manifest.get("excluded_token_ids", []))
    any_ce = next(iter(ce.values()))
    print(f"  CE clean {any_ce.ce_clean:.3f}, zero-ablated {any_ce.ce_ablated:.3f} ({any_ce.n_tokens:,} tokens)")
    print("  prefix   | matryoshka FVU   L0     CE    CE score | batchtopk first-w FVU   L0     CE    CE score")
    for w in widths:
        a, b = ce[f"matryoshka[:{w}]"], ce[f"batchtopk[:{w}]"]
        (fm, lm), (fb, lb) = stats["matryoshka"][w], stats["batchtopk"][w]
        print(f"  {w:8d} | {fm:14.3f} {lm:6.1f} {a.ce_spliced:6.3f} {a.ce_loss_score:8.3f} | "
              f"{fb:21.3f} {lb:6.1f} {b.ce_spliced:6.3f} {b.ce_loss_score:8.3f}")
    print(f"  (folders under {work})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput", help="Matryoshka vs BatchTopK train-step time")
    t.add_argument("--sizes", default="576x4608,768x16384", help="d_in x latents, comma separated")
    t.add_argument("--batch", type=int, default=4096)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--steps", type=int, default=4, help="timed steps per kind per round")
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("smollm2", help="prefix FVU / L0 / CE of a Matryoshka SAE on a real SmolLM2 cache")
    s.add_argument("--layer", type=int, default=10)
    s.add_argument("--tokens", type=int, default=131072)
    s.add_argument("--expansion", type=int, default=4)
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--steps", type=int, default=600)
    s.add_argument("--batch", type=int, default=1024)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--ce-sequences", type=int, default=32, help="held-out sequences for the spliced CE")
    s.add_argument("--out", help="work folder (reused: an existing cache there is not harvested again)")
    args = ap.parse_args(argv)
    return throughput(args) if args.mode == "throughput" else smollm2(args)


if __name__ == "__main__":
    sys.exit(main())
