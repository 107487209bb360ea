"""Online training vs training on a cache of the same tokens: throughput, who waits on whom, held-out FVU.

On one harvest plan ([model], [corpus], [harvest] as below) it
  1. harvests the cache (timed: the cache path's up-front cost),
  2. trains a TopK SAE on that cache (`CacheSource`),
  3. trains the same SAE online (`ModelSource`: the model computes the same rows in a background thread),
and prints, for both: training tokens/s, the share of the wall time the trainer waited for data, and (online)
the share the model waited on a full buffer and was busy; then both dictionaries' FVU on the held-out split and
the largest parameter difference between them (the two runs see the same batches, so it should be 0).

    OMP_NUM_THREADS=1 .venv/bin/python bench/online.py --n-tokens 32768 --steps 48 --batch-size 512
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


class TimedSource:
    """A BatchSource wrapper that records how long the trainer waited in next(batch) (for the cache side)."""

    def __init__(self, source):
        self.source, self.keys, self.batch_size, self.identity = source, source.keys, source.batch_size, source.identity
        self.wait, self.since = 0.0, time.perf_counter()

    def rows(self):
        return self.source.rows()

    def sample(self, n):
        return self.source.sample(n)

    def view(self, keys, batch_size):
        return TimedSource(self.source.view(keys, batch_size))

    def describe(self):
        return self.source.describe()

    def iterate(self, start_batch=0):
        it = self.source.iterate(start_batch)
        self.since = time.perf_counter()
        try:
            while True:
                t = time.perf_counter()
                batch = next(it)
                self.wait += time.perf_counter() - t
                yield batch
        finally:
            it.close()

    def stats(self):
        now = time.perf_counter()
        out = {"data_wait_frac": self.wait / max(now - self.since, 1e-9)}
        self.wait, self.since = 0.0, now
        return out


def held_out_fvu(decomposer, cache, key: str) -> float:
    """Fraction of variance unexplained on every held-out row of `cache` (raw activations)."""
    import jax.numpy as jnp

    from dictlearn.activations.cache import to_float32

    x = np.concatenate([to_float32(cache.shard_arrays(i, [key])[key]) for i in cache.shard_ids("eval")])
    err = 0.0
    for lo in range(0, len(x), 4096):
        chunk = jnp.asarray(x[lo : lo + 4096])
        err += float(jnp.sum((decomposer.decode(decomposer.encode(chunk)) - chunk) ** 2))
    return err / float(np.sum((x - x.mean(0)) ** 2))


def train_once(source, spec_args, cfg, folder: Path):
    """(trained decomposer, wall seconds, the source's statistics over the run (one log record), the log)."""
    from dictlearn.decomposers import REGISTRY
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import DecomposerSpec, train

    spec = DecomposerSpec(name="topk", kind="topk", config=REGISTRY["topk"].config_cls(**spec_args), folder=folder / "topk")
    t = time.perf_counter()
    result = train([spec], source, cfg, WandbConfig(mode="disabled"), log_dir=folder)
    wall = time.perf_counter() - t
    log = result.logs["topk"]
    keys = [k for k in ("data_wait_frac", "model_wait_frac", "model_busy_frac", "model_tokens_per_s") if k in log[0]]
    return result.decomposers["topk"], wall, {k: float(np.mean([r[k] for r in log])) for k in keys}, log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--corpus", default=str(ASSETS / "english-corpus.jsonl.gz"))
    ap.add_argument("--hookpoint", default="resid_post.10")
    ap.add_argument("--n-tokens", type=int, default=32768, help="the harvest plan: corpus tokens")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--shard-mb", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()

    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest
    from dictlearn.activations.models import load_model
    from dictlearn.activations.online import ModelSource, OnlinePlan
    from dictlearn.trainers.data import CacheSource
    from dictlearn.trainers.sgd import TrainConfig

    torch.set_num_threads(args.torch_threads)
    loaded = load_model(args.model)
    corpus = CorpusConfig(path=args.corpus, context_length=args.context)
    hcfg = HarvestConfig(hookpoints=[args.hookpoint], n_tokens=args.n_tokens, shard_mb=args.shard_mb, eval_fraction=0.1)
    cfg = TrainConfig(batch_size=args.batch_size, n_steps=args.steps, lr=5e-4, warmup_steps=max(1, args.steps // 10),
                      log_every=args.steps, checkpoint_every=10 ** 9,  # one log record: the source's stats over the run sample_tokens=args.batch_size * 4,
                      progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        cache = harvest(loaded, corpus, hcfg, tmp / "cache", progress=False)
        harvest_s = time.perf_counter() - t
        t = time.perf_counter()
        online = OnlinePlan(loaded, corpus, hcfg)
        plan_s = time.perf_counter() - t
        d_in = online.widths[args.hookpoint]
        spec_args = dict(d_in=d_in, n_features=args.expansion * d_in, k=args.k, hookpoint_in=args.hookpoint)
        keys = [args.hookpoint]
        dec_c, wall_c, stats_c, _ = train_once(TimedSource(CacheSource(cache, keys, args.batch_size)), spec_args, cfg, tmp / "c")
        dec_o, wall_o, stats_o, _ = train_once(ModelSource(online, keys, args.batch_size), spec_args, cfg, tmp / "o")
        fvu_c, fvu_o = held_out_fvu(dec_c, cache, args.hookpoint), held_out_fvu(dec_o, cache, args.hookpoint)
        from flax import nnx

        pc, po = (dict(nnx.to_flat_state(nnx.state(d, nnx.Param))) for d in (dec_c, dec_o))
        diff = max(float(np.max(np.abs(np.asarray(pc[k].get_value()) - np.asarray(po[k].get_value())))) for k in pc)

    tokens = args.steps * args.batch_size
    print(f"plan: {args.n_tokens:,} tokens of {Path(args.corpus).name}, {args.hookpoint} (width {d_in}); "
          f"{online.plan.n_shards} shards, {sum(online.shard_rows):,} rows; TopK {args.expansion}x k={args.k}, "
          f"{args.steps} steps of {args.batch_size}; torch threads {args.torch_threads}")
    print(f"cache path: harvest {harvest_s:.1f} s ({args.n_tokens / harvest_s:,.0f} tok/s), then train {wall_c:.1f} s")
    print(f"online:     tokenise + count rows {plan_s:.1f} s, then train {wall_o:.1f} s (the model inside)")
    print()
    print("| source | train tokens/s | trainer waits for data | model waits on full buffer | model busy | model tokens/s "
          "| held-out FVU |")
    print("|---|---|---|---|---|---|---|")
    print(f"| cache  | {tokens / wall_c:,.0f} | {stats_c['data_wait_frac']:.1%} | - | - | {args.n_tokens / harvest_s:,.0f} "
          f"(harvest) | {fvu_c:.4f} |")
    print(f"| online | {tokens / wall_o:,.0f} | {stats_o['data_wait_frac']:.1%} | {stats_o['model_wait_frac']:.1%} | "
          f"{stats_o['model_busy_frac']:.1%} | {stats_o['model_tokens_per_s'] / max(stats_o['model_busy_frac'], 1e-9):,.0f} "
          f"(while busy) | {fvu_o:.4f} |")
    print()
    print(f"largest parameter difference, online vs cache: {diff:.3g} (same batches: 0 expected on one machine)")


if __name__ == "__main__":
    main()
