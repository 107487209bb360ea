"""The evaluation suite: score every decomposer of a run the same way and write the comparison report.

    out_dir/decomposers/<name>/   ->   out_dir/eval/metrics.json, report.md, plots/, feature_cards/<name>/,
                                       records/<name>.json (one per decomposer, reused while nothing changed),
                                       steering.json (when [eval.steering] is given)

One pass over the held-out rows of the cache feeds every decomposer the same batches (reconstruction,
sparsity, feature statistics and top contexts); one set of clean and zero-ablated model runs serves every
decomposer's spliced-in downstream loss; steering is the separate `eval.steering` module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dictlearn.activations.cache import ActivationCache, to_float32
from dictlearn.eval.report import json_safe

RECORDS = "records"


class EvalError(ValueError):
    """An evaluation that cannot run as configured."""


@dataclass
class EvalConfig:
    """The `[eval]` table of a run config."""

    n_eval_rows: int = 65_536  # held-out cache rows for reconstruction, sparsity and feature cards (capped at the split)
    batch_size: int = 4096  # rows per batch through each decomposer
    n_downstream_sequences: int = 16  # held-out sequences for the spliced-in loss (0 skips it)
    downstream_batch_size: int = 4  # sequences per model forward
    downstream_context: int = 0  # tokens of each sequence to use (0: the cache's context length)
    n_feature_cards: int = 32  # cards per decomposer (a seeded sample of live features; 0 skips cards)
    top_k_contexts: int = 8  # top activating contexts per card
    context_before: int = 12  # tokens shown before the activating one
    context_after: int = 4  # and after it
    n_vocab_tokens: int = 10  # promoted tokens per card
    decomposers: list[str] = field(default_factory=list)  # names to evaluate ([]: every one under decomposers/)
    cache: str = ""  # the activation cache ("": train.cache, else <out_dir>/cache)
    torch_threads: int = 0  # torch intra-op threads (0: torch's default; 1 is fastest on a busy shared CPU)
    seed: int = 0
    steering: dict[str, Any] | None = None  # the [eval.steering] table (eval.steering.SteeringConfig); absent: no steering

    def __post_init__(self) -> None:
        for name in ("n_eval_rows", "batch_size", "downstream_batch_size", "top_k_contexts", "n_vocab_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_downstream_sequences", "downstream_context", "n_feature_cards", "context_before",
                     "context_after", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.downstream_context == 1:
            raise ValueError("downstream_context must be 0 (the whole sequence) or at least 2 tokens")


# --- finding and loading decomposers ------------------------------------------------------------------------------
def load_kinds() -> None:
    """Import every module of dictlearn.decomposers so that each kind registers itself."""
    import dictlearn.decomposers as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def find_decomposers(folder: Path, names: list[str]) -> dict[str, Path]:
    """name -> folder of every saved decomposer under `folder` (or just `names`, which must exist)."""
    from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE

    found = {p.name: p for p in sorted(folder.glob("*")) if (p / CONFIG_FILE).is_file() and (p / PARAMS_FILE).is_file()}
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise EvalError(f"eval.decomposers names {missing}, not saved under {folder}; "
                            f"saved: {', '.join(found) or 'none (run dictlearn train first)'}")
        return {n: found[n] for n in names}
    if not found:
        raise EvalError(f"no trained decomposers under {folder}; run `dictlearn train CONFIG.toml` first")
    return found


def _fingerprint(folder: Path, parts: dict[str, Any]) -> str:
    """Changes when the decomposer's files, the eval config or the cache change."""
    from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE

    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in (CONFIG_FILE, PARAMS_FILE):
        st = (folder / f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


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
        for start in range(0, take, batch_size):
            stop = min(take, start + batch_size)
            pending.append({k: v[start:stop] for k, v in arrays.items()})
            have += stop - start
            while have >= batch_size:
                joined = {k: np.concatenate([p[k] for p in pending]) for k in keys}
                yield {k: _as_float(v[:batch_size]) for k, v in joined.items()}
                rest = {k: v[batch_size:] for k, v in joined.items()}
                have -= batch_size
                pending = [rest] if have else []
    if have:
        yield {k: _as_float(np.concatenate([p[k] for p in pending])) for k in keys}


def _as_float(a: np.ndarray) -> np.ndarray:
    return to_float32(a) if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") else np.array(a)


def downstream_sequences(cache: ActivationCache, n: int, context: int = 0) -> np.ndarray:
    """(n, T) token ids of n held-out sequences spread evenly over the eval split (T = context or the cache's)."""
    ids = cache.eval_sequences()
    if len(ids) == 0:
        raise EvalError(f"the cache at {cache.path} has no held-out sequences for the downstream loss")
    pick = ids[np.unique(np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int))]
    tokens = cache.sequence_tokens(pick)
    return tokens[:, :context] if context else tokens


# --- the suite --------------------------------------------------------------------------------------------------
DOWNSTREAM_KEYS = ("ce_clean", "ce_spliced", "ce_ablated", "ce_loss_increase", "ce_loss_score", "kl_spliced",
                   "kl_ablated", "kl_score", "n_downstream_tokens")


def evaluate_run(root: Path, cfg: EvalConfig, force: bool = False, log: Callable[[str], None] = print,
                 cache_path: Path | None = None, model_config: Any = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate every decomposer under root/decomposers against the cache; write root/eval. Returns metrics.

    model_config: a `ModelConfig` (the run's [model] table) to load the model with; None: the cache's model
    on the CPU. Either way its weights must be the ones the cache was harvested from."""
    from dictlearn.decomposers.base import load

    t_start = time.perf_counter()
    out = root / "eval"
    steering_cfg = _steering_config(cfg)  # a bad [eval.steering] fails before any work
    cache = ActivationCache.open(cache_path or root / "cache")
    cache.verify(checksums=False)
    folders = find_decomposers(root / "decomposers", cfg.decomposers)
    load_kinds()
    decomposers = {name: load(folder) for name, folder in folders.items()}
    for name, d in decomposers.items():
        for hp in (d.config.hookpoint_in, d.config.hookpoint_out):
            if hp not in cache.hookpoints:
                raise EvalError(f"decomposer {name!r} uses {hp}, which the cache at {cache.path} does not hold "
                                f"(it holds {', '.join(cache.hookpoints)})")
    basis = {"eval": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("decomposers", "steering", "torch_threads")},
             "cache": [cache.manifest.get("n_rows"), cache.manifest.get("model"), len(cache.shards)]}
    fingerprints = {n: _fingerprint(folders[n], basis) for n in decomposers}
    records: dict[str, dict] = {}
    for n in decomposers:
        path = out / RECORDS / f"{n}.json"
        if not force and path.is_file():
            old = json.loads(path.read_text())
            if old.get("fingerprint") == fingerprints[n]:
                records[n] = old
    todo = {n: d for n, d in decomposers.items() if n not in records}
    if records:
        log(f"eval: reusing the results of {', '.join(records)} (unchanged; --force re-evaluates)")

    model = None
    if todo:
        log(f"eval: {len(todo)} decomposer(s) on up to {cfg.n_eval_rows:,} held-out rows of {cache.path}")
        recon = _reconstruction(cache, todo, cfg, log, progress)
        needs_model = cfg.n_downstream_sequences > 0 or cfg.n_feature_cards > 0 or steering_cfg is not None
        if needs_model:
            model = _load_model(cache, cfg, model_config)
        down = _downstream(model, cache, todo, cfg, log, progress) if cfg.n_downstream_sequences > 0 else ({}, 0.0)
        for n, d in todo.items():
            t0 = time.perf_counter()
            if cfg.n_feature_cards > 0:
                _cards(model, cache, n, d, recon, cfg, out / "feature_cards" / n)
            acc, seconds = recon["acc"][n], recon["seconds"][n]
            records[n] = {
                "name": n, "kind": d.kind, "hookpoint_in": d.config.hookpoint_in, "hookpoint_out": d.config.hookpoint_out,
                "d_in": d.config.d_in, "d_out": d.config.d_out, "n_features": d.config.n_features,
                **acc.metrics(),
                **{k: down[0].get(n, {}).get(k) for k in DOWNSTREAM_KEYS},
                "steering": None,
                "seconds": {"reconstruction": seconds, "downstream": down[1] / len(todo),
                            "feature_cards": time.perf_counter() - t0},
                "fingerprint": fingerprints[n],
            }
            (out / RECORDS).mkdir(parents=True, exist_ok=True)
            (out / RECORDS / f"{n}.json").write_text(json.dumps(json_safe(records[n]), indent=1))

    steering = None
    if steering_cfg is not None:
        steering = _steering(out, cache, decomposers, fingerprints, steering_cfg, cfg, model, model_config, log)
        for n in records:
            rec = (steering or {}).get("records", {}).get(n)
            records[n]["steering"] = rec.get("summary") if rec else None

    from dictlearn.eval.report import write_report

    meta = {"cache": str(cache.path), "model": cache.model_name, "n_eval_rows": cfg.n_eval_rows,
            "eval_config": dataclasses.asdict(cfg), "seconds": time.perf_counter() - t_start}
    ordered = [json_safe(records[n]) for n in decomposers]
    write_report(out, meta, ordered, steering=json_safe(steering) if steering else None)
    log(f"eval: wrote {out / 'metrics.json'} and {out / 'report.md'} in {meta['seconds']:.0f} s")
    return {"meta": meta, "decomposers": ordered}


def _load_model(cache: ActivationCache, cfg: EvalConfig, model_config: Any = None):
    import torch

    from dictlearn.activations.models import load_model

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    info = cache.manifest["model"]
    loaded = model_config.load() if model_config is not None else load_model(info["name"], dtype=info.get("dtype", "float32"))
    if info.get("fingerprint") and loaded.fingerprint != info["fingerprint"]:
        raise EvalError(f"the model {info['name']!r} now has weights {loaded.fingerprint}, but the cache was harvested "
                        f"from {info['fingerprint']}; harvest and train again, or point eval.cache at a matching cache")
    return loaded


def _reconstruction(cache, todo, cfg, log, progress) -> dict[str, Any]:
    from dictlearn.eval.reconstruction import ReconstructionAccumulator, make_batch_stats_fn, mean_of

    outs = sorted({d.config.hookpoint_out for d in todo.values()})
    keys = sorted({h for d in todo.values() for h in (d.config.hookpoint_in, d.config.hookpoint_out)})
    total = sum(q for _, q in eval_row_quota(cache, cfg.n_eval_rows))
    t0 = time.perf_counter()
    means = {o: mean_of(b[o] for b in eval_batches(cache, [o], cfg.n_eval_rows, cfg.batch_size)) for o in outs}
    shared = (time.perf_counter() - t0) / len(todo)
    top_k = cfg.top_k_contexts if cfg.n_feature_cards > 0 else 0
    fns = {n: make_batch_stats_fn(d, top_k=top_k, target_mean=means[d.config.hookpoint_out]) for n, d in todo.items()}
    accs = {n: ReconstructionAccumulator(int(d.config.n_features), top_k=top_k) for n, d in todo.items()}
    seconds = {n: shared for n in todo}
    seqs, poss = [], []
    bar = _bar(total, "reconstruction (rows)", progress)
    offset = 0
    for batch in eval_batches(cache, keys, cfg.n_eval_rows, cfg.batch_size):
        b = len(batch["seq"])
        w = np.zeros(cfg.batch_size, np.float32)
        w[:b] = 1
        padded = {k: _pad(v, cfg.batch_size) for k, v in batch.items() if k in keys}
        for n, d in todo.items():
            t = time.perf_counter()
            accs[n].add(fns[n](padded[d.config.hookpoint_in], padded[d.config.hookpoint_out], w), row_offset=offset)
            seconds[n] += time.perf_counter() - t
        seqs.append(batch["seq"])
        poss.append(batch["pos"])
        offset += b
        bar.update(b)
    bar.close()
    for n in todo:
        m = accs[n].metrics()
        log(f"eval: {n}: fvu {m['fvu']:.4f}  l0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}  ({seconds[n]:.1f} s)")
    return {"acc": accs, "seconds": seconds, "row_seq": np.concatenate(seqs), "row_pos": np.concatenate(poss)}


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    return a if len(a) == n else np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def _downstream(loaded, cache, todo, cfg, log, progress) -> tuple[dict[str, dict], float]:
    from dictlearn.eval.downstream import evaluate_downstream

    seqs = downstream_sequences(cache, cfg.n_downstream_sequences, cfg.downstream_context)
    excluded = cache.manifest.get("excluded_token_ids", [])
    t0 = time.perf_counter()
    bar = _bar(len(seqs), f"downstream loss ({len(seqs)} x {seqs.shape[1]} tokens, sequences)", progress)
    res = evaluate_downstream(loaded.model, seqs, todo, excluded_token_ids=excluded, batch_size=cfg.downstream_batch_size,
                              progress=bar.update)
    bar.close()
    seconds = time.perf_counter() - t0
    for n, r in res.items():
        log(f"eval: {n}: CE clean {r.ce_clean:.3f} spliced {r.ce_spliced:.3f} ablated {r.ce_ablated:.3f}  "
            f"score {r.ce_loss_score:.3f}  KL score {r.kl_score:.3f}")
    log(f"eval: downstream loss in {seconds:.0f} s ({'resumed' if all(r.resumed for r in res.values()) else 'full'} forwards)")
    return {n: r.as_dict() for n, r in res.items()}, seconds


def _cards(loaded, cache, name, d, recon, cfg, folder: Path) -> None:
    from dictlearn.activations import hookpoints as hpmod
    from dictlearn.eval.feature_cards import build_cards, select_features, vocab_projection, write_cards

    acc = recon["acc"][name]
    stats = acc.feature_stats()
    picked = select_features(stats["frequency"], cfg.n_feature_cards, seed=cfg.seed)
    vocab = None
    if picked:
        hp = hpmod.resolve(loaded.model, [d.config.hookpoint_out], probe_widths=False)[0]
        directions = np.asarray(d.features())[np.asarray(picked)]
        vocab = vocab_projection(loaded.model, hp, directions, k=cfg.n_vocab_tokens)
    cards = build_cards(picked, stats, acc.top_vals, acc.top_rows, recon["row_seq"], recon["row_pos"],
                        cache.sequence_tokens, loaded.tokenizer, vocab=vocab, window=(cfg.context_before, cfg.context_after))
    meta = {"kind": d.kind, "hookpoint_in": d.config.hookpoint_in, "hookpoint_out": d.config.hookpoint_out,
            "n_features": d.config.n_features, "n_tokens": int(acc.n)}
    write_cards(folder, name, meta, cards, stats)


def _steering_config(cfg: EvalConfig):
    if cfg.steering is None:
        return None
    from dictlearn.config import from_dict
    from dictlearn.eval.steering import SteeringConfig

    return from_dict(SteeringConfig, cfg.steering, where="[eval.steering]")


def _steering(out, cache, decomposers, fingerprints, steering_cfg, cfg, loaded, model_config, log) -> dict | None:
    """Run eval.steering over every decomposer (reused while no decomposer and no option changed)."""
    from dictlearn.eval.steering import evaluate_steering

    path = out / "steering.json"
    key = hashlib.sha256(json.dumps([fingerprints, dataclasses.asdict(steering_cfg)], sort_keys=True).encode()).hexdigest()[:16]
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") == key:
            log("eval: reusing steering.json (unchanged)")
            return old
    if loaded is None:
        loaded = _load_model(cache, cfg, model_config)
    t0 = time.perf_counter()
    result = evaluate_steering(loaded.model, loaded.tokenizer, decomposers, cache, steering_cfg, log=log)
    result = json_safe({**result, "fingerprint": key, "seconds": time.perf_counter() - t0})
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log(f"eval: steering in {result['seconds']:.0f} s")
    return result


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
