"""Harvest throughput: the bare truncated forward vs the full harvest, and the loader reading back.

In one process, on the same packed sequences, alternately runs
  bare:    the model forward ending after the last hooked layer (one stop hook, nothing captured), and
  harvest: `dictlearn.activations.harvest.harvest` (tokenise, capture, convert, shuffle, write, checksum)
`--repeats` times each and prints the median tokens/s of both and their ratio (target >= 0.90), then
the loader's rows/s streaming the last cache back. Wall-clock figures on a shared machine are noisy:
compare the ratio, taken side by side, rather than absolute numbers across runs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/harvest.py --n-tokens 16384 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dictlearn.activations import hookpoints as H
from dictlearn.activations.corpus import CorpusConfig, packed_sequences
from dictlearn.activations.harvest import HarvestConfig, harvest
from dictlearn.activations.loader import BatchLoader
from dictlearn.activations.models import load_model

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


def bare_forward(model, batches: list[torch.Tensor], layer_path: str) -> tuple[float, float]:
    """(wall, CPU) seconds for the forward passes over `batches`, stopped after the module at `layer_path`."""
    def halt(mod, args, output):
        raise H.StopForward()

    handle = model.get_submodule(layer_path).register_forward_hook(halt)
    try:
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for ids in batches:
                H.run_forward(model, ids)
        return time.perf_counter() - t, time.process_time() - c
    finally:
        handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--corpus", default=str(ASSETS / "english-corpus.jsonl.gz"))
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--n-tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader-batch", type=int, default=4096)
    args = ap.parse_args()

    loaded = load_model(args.model)
    L = args.layer
    hookpoints = [f"resid_post.{L}", f"mlp_in.{L}", f"mlp_out.{L}", f"mlp_hidden.{L}"]
    corpus = CorpusConfig(path=args.corpus, context_length=args.context)
    config = HarvestConfig(hookpoints=hookpoints, n_tokens=args.n_tokens, batch_size=args.batch_size, dtype=args.dtype,
                           shard_mb=32, eval_fraction=0.0)
    n_seq = -(-args.n_tokens // args.context)
    seqs = [s for _, s in zip(range(n_seq), packed_sequences(corpus, loaded.tokenizer))]
    batches = [torch.from_numpy(np.stack(seqs[i : i + args.batch_size]).astype(np.int64))
               for i in range(0, n_seq, args.batch_size)]
    tokens = n_seq * args.context
    layer_path = f"{H.decoder_layers_path(loaded.model)}.{L}"
    print(f"model {args.model}: {H.n_layers(loaded.model)} layers, stop after layer {L}; {tokens:,} tokens "
          f"({len(batches)} batches of {args.batch_size} x {args.context}), {torch.get_num_threads()} torch threads")

    bare_forward(loaded.model, batches[:1], layer_path)  # warm-up
    work = Path(tempfile.mkdtemp(prefix="bench-harvest-"))
    bare_tps, harvest_tps, ratios, cpu_ratios = [], [], [], []
    try:
        for r in range(args.repeats):
            tb, cb = bare_forward(loaded.model, batches, layer_path)
            out = work / f"cache{r}"
            t, c = time.perf_counter(), time.process_time()
            harvest(loaded, corpus, config, out, progress=False)
            th, ch = time.perf_counter() - t, time.process_time() - c
            bare_tps.append(tokens / tb)
            harvest_tps.append(tokens / th)
            ratios.append(tb / th)
            cpu_ratios.append(cb / ch)
            print(f"  repeat {r}: bare {tokens / tb:6.0f} tok/s ({tokens / cb:6.0f} per CPU-s)   "
                  f"harvest {tokens / th:6.0f} tok/s ({tokens / ch:6.0f} per CPU-s)   ratio {tb / th:.3f} (CPU {cb / ch:.3f})")
            if r < args.repeats - 1:
                shutil.rmtree(out)
        print(f"median: bare truncated forward {statistics.median(bare_tps):.0f} tok/s, "
              f"harvest {statistics.median(harvest_tps):.0f} tok/s, ratio {statistics.median(ratios):.3f} "
              f"(by CPU time {statistics.median(cpu_ratios):.3f}; target >= 0.90)")

        from dictlearn.activations.cache import ActivationCache

        cache = ActivationCache.open(out)
        for keys in ([f"resid_post.{L}"], hookpoints):
            bs = min(args.loader_batch, cache.rows("train"))
            loader = BatchLoader(cache, keys, bs, split="train", seed=0)
            n_batches = max(8, 2 * loader.batches_per_epoch)
            it = loader.iterate()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(n_batches):
                next(it)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            it.close()
            print(f"loader {'+'.join(keys)}: {n_batches * bs / dt:,.0f} rows/s ({n_batches * bs / dc:,.0f} per CPU-s; "
                  f"batch {bs}, {n_batches} batches, float32 out)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
