"""The evaluation stage: score decomposers the same way, whatever their kind.

    records = evaluate(decomposers, model, cache, cfg, cards_dir=...)   # {name: record}

One pass over the held-out rows of the cache feeds every decomposer the same batches (reconstruction,
sparsity, feature statistics and top contexts); one set of clean and zero-ablated model runs serves every
decomposer's spliced-in downstream loss; steering is the separate `eval.steering` package. The shards read
are checked against their sha256 first, and a metric that is not finite is an error naming the decomposer
and the shards. Where the decomposers, model and cache come from, and which results are still up to date,
is the run's business (dictlearn.run and `dictlearn eval`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dictlearn.activations.cache import ActivationCache, to_float32
from dictlearn.eval.reconstruction import has_site_axis, n_latents, n_sites, site_hookpoints

RECORDS = "records"
SHARD_KEY = "_shard"  # per-row shard index carried through the eval batches (to name a shard in errors)


class EvalError(ValueError):
    """An evaluation that cannot run as configured."""


OPTIONAL_STAGES = ("steering", "probing", "absorption", "matching")  # [eval.<name>] tables: absent or false is off
LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass
class OodConfig:
    """One `[[eval.ood]]` entry: the run's saved dictionaries scored on another text, from a fresh eval-only
    harvest of it (same model, hookpoints and dtype) in <out_dir>/eval_ood/<label>/."""

    label: str  # names the folder <out_dir>/eval_ood/<label>/ and the report's column
    corpus: dict[str, Any]  # a table like [corpus] (path, field, mode, ...); context_length left out: the run's
    n_tokens: int = 16_384  # tokens of it to harvest and score (every shard held out)
    n_feature_cards: int = 0  # feature cards per decomposer on this text (0: none)
    n_downstream_sequences: int | None = None  # its sequences for the spliced-in loss (None: [eval]'s; 0 skips it)

    def __post_init__(self) -> None:
        if not self.label or not set(self.label) <= LABEL_CHARS or self.label.startswith("."):
            raise ValueError(f"ood label {self.label!r} must be a plain folder name (letters, digits, '.', '_', '-')")
        if "path" not in self.corpus:
            raise ValueError(f"ood entry {self.label!r}: its corpus table needs a path")
        if self.n_tokens < 1 or self.n_feature_cards < 0 or (self.n_downstream_sequences or 0) < 0:
            raise ValueError(f"ood entry {self.label!r}: n_tokens must be at least 1, n_feature_cards and "
                             "n_downstream_sequences 0 or more")


@dataclass
class EvalConfig:
    """The `[eval]` table of a run config."""

    n_eval_rows: int = 65_536  # held-out cache rows for reconstruction, sparsity and feature cards (capped at the split)
    batch_size: int = 4096  # rows per batch through each decomposer
    n_downstream_sequences: int = 16  # held-out sequences for the spliced-in loss (0 skips it)
    downstream_batch_size: int = 4  # sequences per model forward
    downstream_context: int = 0  # tokens of each sequence to use (0: the cache's context length)
    n_feature_cards: int = 32  # cards per decomposer, per layer for a cross-layer transcoder (a seeded sample of live features; 0 skips cards)
    top_k_contexts: int = 8  # top activating contexts per card
    context_before: int = 12  # tokens shown before the activating one
    context_after: int = 4  # and after it
    n_vocab_tokens: int = 10  # promoted tokens per card
    decomposers: list[str] = field(default_factory=list)  # names to evaluate ([]: every one under decomposers/)
    torch_threads: int = 0  # torch intra-op threads (0: torch's default; 1 is fastest on a busy shared CPU)
    seed: int = 0  # seeds the sample of features that get cards
    steering: dict[str, Any] | bool | None = None  # the [eval.steering] table (eval.steering.SteeringConfig); absent or false: no steering; true: the defaults
    probing: dict[str, Any] | bool | None = None  # the [eval.probing] table (eval.probing.ProbingConfig); absent or false: off; true: the defaults
    absorption: dict[str, Any] | bool | None = None  # the [eval.absorption] table (eval.absorption.AbsorptionConfig); absent or false: off
    matching: dict[str, Any] | bool | None = None  # the [eval.matching] table (eval.matching.MatchingConfig); absent or false: off
    ood: list[OodConfig] = field(default_factory=list)  # [[eval.ood]] entries, the same scores on other text: label, corpus (a table like [corpus]), n_tokens (16384), n_feature_cards (0), n_downstream_sequences ([eval]'s); see docs/evaluation.md

    def __post_init__(self) -> None:
        for name in OPTIONAL_STAGES:  # `--set eval.steering=false` turns a stage off, `=true` on with its defaults
            value = getattr(self, name)
            if isinstance(value, bool):
                setattr(self, name, {} if value else None)
            elif value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a table, true or false, got {value!r}")
        labels = [o.label for o in self.ood]
        if len(set(labels)) != len(labels):
            raise ValueError(f"[[eval.ood]] labels must differ (each names a folder), got {labels}")
        for name in ("n_eval_rows", "batch_size", "downstream_batch_size", "top_k_contexts", "n_vocab_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_downstream_sequences", "downstream_context", "n_feature_cards", "context_before",
                     "context_after", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.downstream_context == 1:
            raise ValueError("downstream_context must be 0 (the whole sequence) or at least 2 tokens")


# --- reading the held-out rows ----------------------------------------------------------------------------------
def eval_row_quota(cache: ActivationCache, n_rows: int) -> list[tuple[int, int]]:
    """(shard index, rows to take) over the eval shards: a share of n_rows proportional to each shard's size.

    Rows inside a shard are shuffled at harvest time, so a shard's first rows are a uniform sample of it."""
    shards = cache.shard_ids("eval")
    sizes = np.array([cache.shards[i]["rows"] for i in shards], np.int64)
    if sizes.sum() == 0:
        raise EvalError(f"the cache at {cache.path} has no held-out rows (no eval shards); harvest with "
                        "harvest.eval_fraction > 0")
    total = min(int(n_rows), int(sizes.sum()))
    quota = np.floor(total * sizes / sizes.sum()).astype(np.int64)
    for i in np.argsort(-(total * sizes / sizes.sum() - quota))[: total - quota.sum()]:
        quota[i] += 1
    return [(int(s), int(q)) for s, q in zip(shards, quota) if q > 0]


def eval_batches(cache: ActivationCache, keys: list[str], n_rows: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches (at most batch_size rows) of the held-out rows: float32 activations plus seq/pos/token_id."""
    keys = list(dict.fromkeys(list(keys) + ["seq", "pos", "token_id"]))
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for shard, take in eval_row_quota(cache, n_rows):
        arrays = cache.shard_arrays(shard, keys)
        arrays[SHARD_KEY] = np.full(take, shard, np.int32)
        keys_here = list(arrays)
        for start in range(0, take, batch_size):
            stop = min(take, start + batch_size)
            pending.append({k: v[start:stop] for k, v in arrays.items()})
            have += stop - start
            while have >= batch_size:
                joined = {k: np.concatenate([p[k] for p in pending]) for k in keys_here}
                yield {k: _as_float(v[:batch_size]) for k, v in joined.items()}
                rest = {k: v[batch_size:] for k, v in joined.items()}
                have -= batch_size
                pending = [rest] if have else []
    if have:
        yield {k: _as_float(np.concatenate([p[k] for p in pending])) for k in pending[0]}


def verify_eval_shards(cache: ActivationCache, n_rows: int) -> None:
    """Check the sha256 of every held-out shard eval reads (a byte flipped after the harvest is refused,
    naming the shard), before any of it is scored."""
    for shard, _ in eval_row_quota(cache, n_rows):
        cache.shard_arrays(shard, [], verify=True)


def _as_float(a: np.ndarray) -> np.ndarray:
    return to_float32(a) if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") else np.array(a)


def downstream_ids(cache: ActivationCache, n: int) -> np.ndarray:
    """The ids of n held-out sequences spread evenly over the eval split."""
    ids = cache.eval_sequences()
    if len(ids) == 0:
        raise EvalError(f"the cache at {cache.path} has no held-out sequences for the downstream loss")
    return ids[np.unique(np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int))]


def downstream_sequences(cache: ActivationCache, n: int, context: int = 0) -> np.ndarray:
    """(n, T) token ids of n held-out sequences spread evenly over the eval split (T = context or the cache's)."""
    tokens = cache.sequence_tokens(downstream_ids(cache, n))
    return tokens[:, :context] if context else tokens


# --- the suite --------------------------------------------------------------------------------------------------
RECORD_FORMAT = 3  # raised when records gain keys (2: n_sites and the per-site figures; 3: l0_target): older records are redone
SITE_KEYS = ("fvu", "l0", "dead_fraction")  # per-site metrics: record keys fvu_per_site, l0_per_site, ...
DOWNSTREAM_KEYS = ("ce_clean", "ce_spliced", "ce_ablated", "ce_loss_increase", "ce_loss_score", "kl_spliced",
                   "kl_ablated", "kl_score", "n_downstream_tokens")


def needs_model(cfg: EvalConfig) -> bool:
    """Whether `evaluate` with these options runs the language model (downstream loss or feature cards)."""
    return cfg.n_downstream_sequences > 0 or cfg.n_feature_cards > 0


def evaluate(decomposers: dict[str, Any], model: Any, cache: ActivationCache, cfg: EvalConfig, *,
             cards_dir: Path | None = None, log: Callable[[str], None] = print, progress: bool = True
             ) -> dict[str, dict[str, Any]]:
    """Score `decomposers` ({name: Decomposer}) on the held-out rows of `cache`; {name: record}.

    model: the LoadedModel the cache was harvested from (None is fine when `needs_model(cfg)` is False);
    cards_dir: where feature cards go (<cards_dir>/<name>/; None: no cards). A decomposer over several sites
    (a cross-layer transcoder) reads stacked batches, is spliced in at every site at once, and its record adds
    the per-site figures (`fvu_per_site`, ...: {hookpoint: value}, one entry for a single-site kind)."""
    for name, d in decomposers.items():
        for hp in [h for hps in site_hookpoints(d) for h in hps]:
            if hp not in cache.hookpoints:
                raise EvalError(f"decomposer {name!r} uses {hp}, which the cache at {cache.path} does not hold "
                                f"(it holds {', '.join(cache.hookpoints)})")
    if not decomposers:
        return {}
    if model is None and needs_model(cfg):
        raise EvalError("the downstream loss and feature cards need the language model; pass it, or set "
                        "eval.n_downstream_sequences = 0 and eval.n_feature_cards = 0")
    verify_eval_shards(cache, cfg.n_eval_rows)
    log(f"eval: {len(decomposers)} decomposer(s) on up to {cfg.n_eval_rows:,} held-out rows of {cache.path}")
    recon = _reconstruction(cache, decomposers, cfg, log, progress)
    down = _downstream(model, cache, decomposers, cfg, log, progress) if cfg.n_downstream_sequences > 0 else ({}, 0.0)
    records = {}
    for n, d in decomposers.items():
        t0 = time.perf_counter()
        if cfg.n_feature_cards > 0 and cards_dir is not None:
            _cards(model, cache, n, d, recon, cfg, Path(cards_dir) / n)
        acc, seconds = recon["acc"][n], recon["seconds"][n]
        records[n] = {
            "name": n, "kind": d.kind, "hookpoint_in": d.config.hookpoint_in, "hookpoint_out": d.config.hookpoint_out,
            "d_in": d.config.d_in, "d_out": d.config.d_out, "n_features": n_latents(d), "n_sites": n_sites(d),
            "l0_target": d.config.sparsity_target(),  # the L0 the config aimed at (None: none); the report marks a miss
            **acc.metrics(),
            **per_site(d, acc),
            **{k: down[0].get(n, {}).get(k) for k in DOWNSTREAM_KEYS},
            "steering": None,
            "seconds": {"reconstruction": seconds, "downstream": down[1] / len(decomposers),
                        "feature_cards": time.perf_counter() - t0},
        }
    return records


def per_site(d: Any, acc: Any) -> dict[str, dict[str, float]]:
    """{"fvu_per_site": {output hookpoint: fvu}, "l0_per_site": {input hookpoint: l0}, ...}: fvu belongs to the
    site written, l0 and the dead fraction to the latents of the site read."""
    ins, outs = site_hookpoints(d)
    m = acc.site_metrics()
    return {f"{k}_per_site": dict(zip(outs if k == "fvu" else ins, m[k])) for k in SITE_KEYS}


def stacked(d: Any, arrays: dict[str, np.ndarray], which: int) -> np.ndarray:
    """The decomposer's input (which=0) or target (which=1) from per-hookpoint arrays (..., d): as they are for
    a single-site kind, stacked in site order as (..., S, d) for a site-axis kind."""
    names = site_hookpoints(d)[which]
    return np.stack([arrays[h] for h in names], axis=-2) if has_site_axis(d) else arrays[names[0]]


def _reconstruction(cache, todo, cfg, log, progress) -> dict[str, Any]:
    from dictlearn.eval.reconstruction import ReconstructionAccumulator, make_batch_stats_fn, mean_of, pad_rows

    outs = sorted({h for d in todo.values() for h in site_hookpoints(d)[1]})
    keys = sorted({h for d in todo.values() for hps in site_hookpoints(d) for h in hps})
    total = sum(q for _, q in eval_row_quota(cache, cfg.n_eval_rows))
    t0 = time.perf_counter()
    means = {o: mean_of(b[o] for b in eval_batches(cache, [o], cfg.n_eval_rows, cfg.batch_size)) for o in outs}
    shared = (time.perf_counter() - t0) / len(todo)
    top_k = cfg.top_k_contexts if cfg.n_feature_cards > 0 else 0
    fns = {n: make_batch_stats_fn(d, top_k=top_k, target_mean=stacked(d, means, 1)) for n, d in todo.items()}
    accs = {n: ReconstructionAccumulator(n_latents(d), top_k=top_k, n_sites=n_sites(d)) for n, d in todo.items()}
    seconds = {n: shared for n in todo}
    seqs, poss = [], []
    bar = _bar(total, "reconstruction (rows)", progress)
    offset = 0
    for batch in eval_batches(cache, keys, cfg.n_eval_rows, cfg.batch_size):
        b = len(batch["seq"])
        w = np.zeros(cfg.batch_size, np.float32)
        w[:b] = 1
        padded = {k: pad_rows(v, cfg.batch_size) for k, v in batch.items() if k in keys}
        for n, d in todo.items():
            t = time.perf_counter()
            sums = fns[n](stacked(d, padded, 0), stacked(d, padded, 1), w)
            _check_finite(n, sums, cache, batch[SHARD_KEY])
            accs[n].add(sums, row_offset=offset)
            seconds[n] += time.perf_counter() - t
        seqs.append(batch["seq"])
        poss.append(batch["pos"])
        offset += b
        bar.update(b)
    bar.close()
    for n in todo:
        m = accs[n].metrics()
        bad = [k for k, v in m.items() if isinstance(v, float) and not np.isfinite(v)]
        if bad:
            raise EvalError(f"decomposer {n!r}: {', '.join(bad)} is not finite on the held-out rows of {cache.path} "
                            f"(shards {', '.join(cache.shards[i]['file'] for i, _ in eval_row_quota(cache, cfg.n_eval_rows))})")
        log(f"eval: {n}: fvu {m['fvu']:.4f}  l0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}  ({seconds[n]:.1f} s)")
    return {"acc": accs, "seconds": seconds, "row_seq": np.concatenate(seqs), "row_pos": np.concatenate(poss)}


_SUMS = ("sse", "ev_sum", "cos_sum", "norm_in_sum", "norm_out_sum", "ratio_sum", "xhat2_sum", "dot_sum", "l0_sum",
         "l1_sum", "m2")


def _check_finite(name: str, sums: dict[str, Any], cache: ActivationCache, shard_ids: np.ndarray) -> None:
    """A batch whose sums are not finite is an error naming the decomposer and the shards it came from."""
    bad = [k for k in _SUMS if k in sums and not np.isfinite(float(sums[k]))]
    if bad:
        files = ", ".join(cache.shards[int(i)]["file"] for i in np.unique(shard_ids))
        raise EvalError(f"decomposer {name!r}: {', '.join(bad)} is not finite on held-out rows from {files} of "
                        f"{cache.path} (an activation there is inf or nan, or the decomposer overflows on it); "
                        f"check that shard with `dictlearn cache verify` or harvest again")


def _downstream(loaded, cache, todo, cfg, log, progress) -> tuple[dict[str, dict], float]:
    from dictlearn.eval.downstream import evaluate_downstream

    seqs = downstream_sequences(cache, cfg.n_downstream_sequences, cfg.downstream_context)
    excluded = cache.manifest.get("excluded_token_ids", [])
    from dictlearn.activations.harvest import kept_positions  # the harvest's own rule: the same positions left out

    keep = kept_positions(cache, downstream_ids(cache, cfg.n_downstream_sequences), seqs)
    t0 = time.perf_counter()
    bar = _bar(len(seqs), f"downstream loss ({len(seqs)} x {seqs.shape[1]} tokens, sequences)", progress)
    res = evaluate_downstream(loaded.model, seqs, todo, excluded_token_ids=excluded, batch_size=cfg.downstream_batch_size,
                              progress=bar.update, keep=keep)
    bar.close()
    seconds = time.perf_counter() - t0
    for n, r in res.items():
        log(f"eval: {n}: CE clean {r.ce_clean:.3f} spliced {r.ce_spliced:.3f} ablated {r.ce_ablated:.3f}  "
            f"score {r.ce_loss_score:.3f}  KL score {r.kl_score:.3f}")
    log(f"eval: downstream loss in {seconds:.0f} s ({'resumed' if all(r.resumed for r in res.values()) else 'full'} forwards)")
    return {n: r.as_dict() for n, r in res.items()}, seconds


def _cards(loaded, cache, name, d, recon, cfg, folder: Path) -> None:
    from dictlearn.eval.feature_cards import (build_cards, select_features, shade_contexts, vocab_projection,
                                              window_activations, window_positions, write_cards)

    acc = recon["acc"][name]
    stats = acc.feature_stats()
    ins, outs = site_hookpoints(d)
    sites = ins if has_site_axis(d) else []  # cards of a site-axis kind name the site (layer) their latent reads
    per = int(d.config.n_features)
    picked = [s * per + f for s in range(n_sites(d))  # a sample per site: every layer of a CLT gets its cards
              for f in select_features(stats["frequency"][s * per : (s + 1) * per], cfg.n_feature_cards, seed=cfg.seed)]
    vocab = suppressed = None
    if picked:
        written = outs if has_site_axis(d) else outs[:1]
        dirs = written_directions(d, np.asarray(picked))
        vocab = vocab_projection(loaded.model, written, dirs, k=cfg.n_vocab_tokens)
        suppressed = vocab_projection(loaded.model, written, dirs, k=cfg.n_vocab_tokens, lowest=True)
    cards = build_cards(picked, stats, acc.top_vals, acc.top_rows, recon["row_seq"], recon["row_pos"],
                        cache.sequence_tokens, loaded.tokenizer, vocab=vocab, window=(cfg.context_before, cfg.context_after),
                        sites=sites, suppressed=suppressed, histograms=acc.act_hist)
    positions = window_positions(cards)  # every token the contexts show: its cached activation, encoded
    found, arrays = window_activations(cache, ins, positions)
    if len(arrays[ins[0]]):
        shade_contexts(cards, positions, found, encode_rows(d, stacked(d, arrays, 0), cfg.batch_size))
    meta = {"kind": d.kind, "hookpoint_in": d.config.hookpoint_in, "hookpoint_out": d.config.hookpoint_out,
            "n_features": n_latents(d), "n_sites": n_sites(d), "n_tokens": int(acc.n)}
    write_cards(folder, name, meta, cards, stats)


def encode_rows(d: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """(n, n_latents) codes of x, jitted once, in chunks of at most batch_size rows padded to a multiple of 256
    (eager encoding measured 2-4x slower: semi-NMF's solve and TopK's selection dispatch op by op)."""
    import jax
    from flax import nnx

    from dictlearn.eval.reconstruction import pad_rows

    graphdef, state = nnx.split(d)
    encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x))
    out = []
    for i in range(0, len(x), batch_size):
        part = x[i : i + batch_size]
        padded = pad_rows(part, min(batch_size, -(-len(part) // 256) * 256))
        out.append(np.asarray(encode(state, padded), np.float32)[: len(part)].reshape(len(part), -1))
    return np.concatenate(out)


def written_directions(d: Any, latents: np.ndarray) -> np.ndarray:
    """What each latent writes at activation 1: (n, d_out) rows of features() for a single-site kind; (n, S, d_out)
    for a site-axis kind, one slot per output site (decode of a one-hot code minus decode of no code, so only
    the contract's decode is used; a cross-layer latent writes to its own layer and every later one)."""
    if not has_site_axis(d):
        return np.asarray(d.features())[latents]
    import jax.numpy as jnp

    count, per = n_sites(d), int(d.config.n_features)
    one_hot = np.zeros((len(latents), count * per), np.float32)
    one_hot[np.arange(len(latents)), latents] = 1.0
    codes = jnp.asarray(one_hot.reshape(len(latents), count, per))
    return np.asarray(d.decode(codes) - d.decode(jnp.zeros_like(codes[:1])), np.float32)


STAGE_CONFIGS = {"steering": ("dictlearn.eval.steering", "SteeringConfig"),  # each optional table's dataclass
                 "probing": ("dictlearn.eval.probing", "ProbingConfig"),
                 "absorption": ("dictlearn.eval.absorption", "AbsorptionConfig"),
                 "matching": ("dictlearn.eval.matching", "MatchingConfig")}


def stage_config(cfg: EvalConfig, name: str):
    """The [eval.<name>] table (OPTIONAL_STAGES) as its stage's config dataclass (None: off); a bad table fails
    before any work."""
    table = getattr(cfg, name)
    if table is None:
        return None
    import importlib

    from dictlearn.config import from_dict

    module, cls = STAGE_CONFIGS[name]
    return from_dict(getattr(importlib.import_module(module), cls), table, where=f"[eval.{name}]")


def steering_config(cfg: EvalConfig):
    """The [eval.steering] table as a SteeringConfig (None: no steering)."""
    return stage_config(cfg, "steering")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="", dynamic_ncols=True, mininterval=2.0)
