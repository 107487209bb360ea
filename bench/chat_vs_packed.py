"""Packed plain text against chat data for an instruct model's SAE (issue 13, after "Training Superior Sparse
Autoencoders for Instruct Models"): the same TopK SAE trained on each, both evaluated on held-out chat data.

Harvests two SmolLM2-135M-Instruct caches of `resid_post.L` with the library API: packed English text
(../shared/assets/english-corpus.jsonl.gz, context 128) and GSM8K conversations in chat mode (the tokenizer's
chat template, one conversation per sequence, the user's and the assistant's tokens, context 256). Trains one
TopK SAE on each with the same settings for the same number of steps x batch (equal token budgets), then
reports, on the chat cache's held-out conversations: FVU (rows) and next-token CE with each reconstruction
spliced in (`dictlearn.eval.downstream`, leaving out the positions the harvest left out).

Usage:
  .venv/bin/python bench/chat_vs_packed.py [--layer 10] [--tokens 51200] [--expansion 4] [--k 32] [--batch 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
CHAT_KEEP_ESTIMATE = 0.6  # share of a chat cache's tokens read that are user/assistant text (the rest: padding, template)


def fvu(model, x: np.ndarray, chunk: int = 4096) -> float:
    """Fraction of variance unexplained on rows `x` (against the rows' own mean)."""
    import jax.numpy as jnp

    err = sum(float(np.sum((x[i : i + chunk] - np.asarray(model.decode(model.encode(jnp.asarray(x[i : i + chunk]))))) ** 2))
              for i in range(0, len(x), chunk))
    return err / float(np.sum((x - x.mean(0)) ** 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=51_200, help="training tokens (rows) each SAE sees")
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ce-sequences", type=int, default=16, help="held-out conversations for the spliced CE")
    ap.add_argument("--out", help="work folder (reused: caches already there are not harvested again)")
    args = ap.parse_args(argv)

    from dictlearn.activations.cache import ActivationCache, to_float32
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest, kept_positions
    from dictlearn.activations.models import load_model
    from dictlearn.decomposers import base
    from dictlearn.eval.downstream import evaluate_downstream
    from dictlearn.trainers.data import CacheSource
    from dictlearn.trainers.sgd import TrainConfig, train
    from dictlearn.trainers.spec import DecomposerSpec, data_keys

    t0 = time.perf_counter()
    hookpoint = f"resid_post.{args.layer}"
    work = Path(args.out or tempfile.mkdtemp(prefix="chat_vs_packed_"))
    loaded = load_model(str(ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    corpora = {
        "packed": (CorpusConfig(path=str(ASSETS / "english-corpus.jsonl.gz"), context_length=128),
                   int(args.tokens * 1.02), 0.0),
        "chat": (CorpusConfig(path=str(ASSETS / "chat-gsm8k-train.jsonl.gz"), mode="chat", context_length=256,
                              roles=["user", "assistant"]), int(args.tokens / CHAT_KEEP_ESTIMATE / 0.8), 0.2),
    }
    caches = {}
    for name, (corpus, n_tokens, eval_fraction) in corpora.items():
        folder = work / f"{name}-cache"
        caches[name] = (ActivationCache.open(folder) if (folder / "manifest.json").is_file() else
                        harvest(loaded, corpus, HarvestConfig(hookpoints=[hookpoint], n_tokens=n_tokens, shard_mb=2,
                                                              batch_size=8, eval_fraction=eval_fraction), folder, progress=False))
        m = caches[name].manifest
        print(f"{name:6s} cache: {m['n_tokens']:,} tokens read, {caches[name].rows('train'):,} train rows; left out "
              + ", ".join(f"{k} {v:,}" for k, v in m["left_out"].items() if v), flush=True)
    t_harvest = time.perf_counter() - t0

    d = caches["chat"].hookpoints[hookpoint]["width"]
    config = base.REGISTRY["topk"].config_cls(d_in=d, n_features=args.expansion * d, k=args.k, hookpoint_in=hookpoint)
    steps = args.tokens // args.batch
    cfg = TrainConfig(batch_size=args.batch, n_steps=steps, lr=args.lr, warmup_steps=steps // 10, progress=False,
                      log_every=max(steps // 4, 1), checkpoint_every=steps, sample_tokens=4096)
    models = {}
    for name, cache in caches.items():
        specs = [DecomposerSpec(name, "topk", config, work / f"sae-{name}")]
        result = train(specs, CacheSource(cache, data_keys(specs), args.batch), cfg)
        models[name] = base.load(result.folders[name])
    t_train = time.perf_counter() - t0 - t_harvest

    chat = caches["chat"]
    held = np.concatenate([np.asarray(to_float32(chat.shard_arrays(i, [hookpoint])[hookpoint]), np.float32)
                           for i in chat.shard_ids("eval")])
    ids = chat.eval_sequences()
    ids = ids[np.unique(np.linspace(0, len(ids) - 1, min(args.ce_sequences, len(ids))).round().astype(int))]
    seqs = chat.sequence_tokens(ids)
    ce = evaluate_downstream(loaded.model, seqs, {f"trained on {n}": m for n, m in models.items()},
                             keep=kept_positions(chat, ids, seqs))
    any_ce = next(iter(ce.values()))
    print()
    print(f"$ .venv/bin/python bench/chat_vs_packed.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"SmolLM2-135M-Instruct {hookpoint}, TopK SAE {config.n_features} latents k {args.k}, {steps} steps x {args.batch} "
          f"= {steps * args.batch:,} training tokens each; held-out chat: {len(held):,} rows (FVU), "
          f"{any_ce.n_tokens:,} tokens of {len(seqs)} conversations (CE)")
    print(f"CE clean {any_ce.ce_clean:.3f}, zero-ablated {any_ce.ce_ablated:.3f}")
    print("SAE trained on | held-out chat FVU | spliced CE | CE increase | CE score | KL spliced")
    for n, r in ce.items():
        print(f"{n.removeprefix('trained on '):14s} | {fvu(models[n.removeprefix('trained on ')], held):17.4f} | "
              f"{r.ce_spliced:10.3f} | {r.ce_spliced - r.ce_clean:11.3f} | {r.ce_loss_score:8.3f} | {r.kl_spliced:10.4f}")
    print(f"(harvest {t_harvest:.0f} s, training {t_train:.0f} s, total {time.perf_counter() - t0:.0f} s; folders under {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
