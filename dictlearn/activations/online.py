"""Train straight from the language model (`train.source = "model"`): no cache of the train split is written.

Design. The loader's window design (`dictlearn.activations.loader`) with the shards computed by the model
instead of read from disk. The harvest's plan fixes the layout (shard k = sequences [k*S, (k+1)*S), the same
held-out shards); shard k is computed by the harvest's own row pipeline (same left-out positions, same storage
dtype, same seeded per-shard shuffle), and a `BatchLoader` over `ComputedShards` (a stand-in for the cache's
train split) mixes them into batches exactly as it mixes a cache's. So an online run sees, batch for batch,
the rows a run on a cache harvested with the same `[model]`, `[corpus]` and `[harvest]` sees
(`tests/test_online.py` checks it row for row, and that the trained parameters are equal).

Overlap. The model runs in a background thread (torch releases the GIL in its kernels) one window ahead of
the loader, driven by a second BatchLoader over zero-width stand-ins, so it computes shards in exactly the
order the loader will ask for them. The trainer's JAX step runs meanwhile. `stats()` reports the share of the
time the trainer waited for data and the model waited on a full buffer.

Mixing guarantee: the loader's (a batch is a uniform sample without replacement from `mix_shards` shards,
i.e. `mix_shards * sequences_per_shard` sequences, reshuffled every epoch). Memory: the model holds at most
`mix_shards + 1` computed shards ahead of the loader (`max_held_rows` <= `held_rows_bound()`), and the loader
at most two windows plus `prefetch` batches, so memory is a few windows whatever `harvest.n_tokens` is; plus
the corpus's token ids (4 bytes per planned token, tokenised once at the start to count each shard's rows).

Exact resume: batch b is a function of (model, corpus, harvest options, seed, b) only; `iterate(b)` computes
only the windows from batch b's on. It is exact where the model's forward is deterministic (the CPU; CUDA
with deterministic kernels). Not supported online: `outlier_norm_factor` (counting the rows it leaves out
needs every shard's activations before the first batch).

Held-out rows: the eval stage reads a small cache of only the plan's held-out shards (`write_held_out`), the
same rows a full harvest's eval split holds, with sequence ids renumbered 0.. so it is an ordinary cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dictlearn.activations import harvest as hv
from dictlearn.activations.cache import FORMAT, FORMAT_VERSION, MANIFEST, ROW_KEYS, ActivationCache, CacheWriter
from dictlearn.activations.corpus import LEFT_OUT_RULES, CorpusConfig, Sequence, left_out, sequences, special_token_ids
from dictlearn.activations.loader import BatchLoader
from dictlearn.activations.models import LoadedModel
from dictlearn.files import FolderLock

HELD_OUT_KEY = "online_held_out"  # marks a cache that holds only an online run's held-out shards


class OnlineError(hv.HarvestError):
    """Online training cannot run as configured."""


class _Stopped(Exception):
    """The consumer closed the stream: the model thread ends after its current forward batch."""


class OnlinePlan:
    """The harvest's plan for a model and corpus, the corpus's token ids, and each shard's row count: what
    every ModelSource (and the held-out cache) of one run shares. The model is used by one thread at a time."""

    def __init__(self, loaded: LoadedModel, corpus: CorpusConfig, config: hv.HarvestConfig):
        if config.outlier_norm_factor > 0:
            raise OnlineError(
                f"harvest.outlier_norm_factor = {config.outlier_norm_factor}: online training cannot count the rows that "
                "filter leaves out before the first batch (it needs every shard's activations); set it to 0, or "
                'harvest a cache and train from it (train.source = "cache")')
        self.loaded, self.corpus, self.config = loaded, corpus, config
        self.plan = hv.plan(loaded, corpus, config)  # bad hookpoints fail here
        self.harvest_identity = hv.identity(loaded, corpus, config)
        text = json.dumps({"source": "model", **self.harvest_identity}, sort_keys=True, default=str)
        self.identity = hashlib.sha256(text.encode()).hexdigest()[:16]
        keeps_template = corpus.mode == "chat" and corpus.template_tokens  # as the harvest decides
        excluded = special_token_ids(loaded.tokenizer).tolist() if config.exclude_special_tokens and not keeps_template else []
        self.rules = {"excluded_token_ids": excluded, "skip_sink_positions": config.skip_sink_positions,
                      "outlier_norm_factor": config.outlier_norm_factor}
        self.lock = threading.Lock()
        self._tokenise()

    def _tokenise(self) -> None:
        p = self.plan
        seqs = list(itertools.islice(sequences(self.corpus, self.loaded.tokenizer), p.n_sequences))
        if len(seqs) < p.n_sequences:
            raise OnlineError(f"the corpus ran out after {len(seqs)} sequences of {p.context_length} tokens "
                              f"({len(seqs) * p.context_length:,} tokens); lower harvest.n_tokens to at most that")
        self.tokens = np.stack([s.tokens for s in seqs]).astype(np.int32)
        self.content = np.stack([s.content for s in seqs]) if self.corpus.mode == "chat" else None
        self.lengths = np.array([s.length for s in seqs], dtype=np.int64) if self.corpus.mode == "chat" else None
        self.shard_rows, self.left_out = [], []
        for k in range(p.n_shards):
            lo, hi = self._span(k)
            keep, counts = left_out(self.tokens[lo:hi], self.rules["excluded_token_ids"], self.rules["skip_sink_positions"],
                                    None if self.content is None else self.content[lo:hi],
                                    None if self.lengths is None else self.lengths[lo:hi])
            self.shard_rows.append(int(keep.sum()))
            self.left_out.append({**counts, "outliers": 0})

    def _span(self, k: int) -> tuple[int, int]:
        s = self.plan.sequences_per_shard
        return k * s, min((k + 1) * s, self.plan.n_sequences)

    @property
    def widths(self) -> dict[str, int]:
        """Stored key -> width, as a cache of this harvest would list them."""
        return dict(self.plan.widths)

    def hookpoints(self) -> dict[str, dict]:
        """name -> {"width"}: what a cache's `hookpoints` says, for building specs."""
        return {k: {"width": w} for k, w in self.plan.widths.items()}

    def sequences(self, k: int) -> list[Sequence]:
        lo, hi = self._span(k)
        full = np.ones(self.plan.context_length, dtype=bool)
        return [Sequence(self.tokens[i], full if self.content is None else self.content[i],
                         self.plan.context_length if self.lengths is None else int(self.lengths[i])) for i in range(lo, hi)]

    def compute(self, k: int, keys: list[str], on_batch: Callable[[int], None] = lambda n: None) -> dict[str, np.ndarray]:
        """Shard k's rows for `keys`, exactly as the harvest writes them (left-out rules, storage dtype, the
        seeded per-shard shuffle); only the hookpoints those keys need are captured."""
        p = self.plan
        hps = [h for h in p.hookpoints if h.name in keys or h.name + hv.GRAD_SUFFIX in keys]
        sub = dataclasses.replace(p, hookpoints=hps, widths={k2: w for k2, w in p.widths.items() if k2 in keys})
        grad_hps = [h for h in hps if h.name + hv.GRAD_SUFFIX in keys]
        with self.lock:
            arrays, _ = hv._shard_rows(self.loaded.model, self.sequences(k), self._span(k)[0], sub, grad_hps,
                                       self.config, self.rules, on_batch)
        n = len(arrays["seq"])
        if n != self.shard_rows[k]:
            raise OnlineError(f"shard {k}: the model pass kept {n} rows but the token count planned {self.shard_rows[k]}")
        perm = np.random.default_rng([self.config.seed, k]).permutation(n)  # the harvest's per-shard shuffle
        return {key: arrays[key][perm] for key in keys}


class ComputedShards:
    """What a BatchLoader reads from a cache's train split, with shard i's arrays from `fetch(i, keys)`."""

    def __init__(self, online: OnlinePlan, fetch: Callable[[int, list[str]], dict[str, np.ndarray]]):
        self.online, self.fetch = online, fetch
        self.path = f"<the model {online.loaded.name!r}>"
        eval_ids = set(online.plan.eval_shards)
        self.shards = [{"rows": r, "split": "eval" if k in eval_ids else "train"} for k, r in enumerate(online.shard_rows)]

    def keys(self) -> list[str]:
        return list(self.online.widths) + list(ROW_KEYS)

    def check_folder(self) -> None:  # nothing on disk to account for
        return None

    def shard_ids(self, split: str = "all") -> list[int]:
        return [i for i, s in enumerate(self.shards) if split == "all" or s["split"] == split]

    def rows(self, split: str = "all") -> int:
        return sum(self.shards[i]["rows"] for i in self.shard_ids(split))

    def shard_arrays(self, index: int, keys: list[str] | None = None, verify: bool = False) -> dict[str, np.ndarray]:
        return self.fetch(index, list(keys if keys is not None else self.keys()))


class ModelSource:
    """A BatchSource (dictlearn.trainers.data) whose rows the language model computes as training runs.

    Batch b equals batch b of `CacheSource` over a cache harvested with the same model, corpus and harvest
    options (and the same seed): see the module docstring for the design, the mixing and memory bounds."""

    def __init__(self, online: OnlinePlan, keys: list[str], batch_size: int, seed: int = 0, mix_shards: int = 4,
                 prefetch: int = 4):
        valid = list(online.widths) + list(ROW_KEYS)
        bad = [k for k in keys if k not in valid]
        if bad:
            raise OnlineError(f"online training computes only {', '.join(valid)}; {', '.join(map(repr, bad))} "
                              "must be listed in harvest.hookpoints (gradients in harvest.gradients)")
        self.online, self.keys, self.batch_size, self.seed = online, list(keys), int(batch_size), seed
        self.mix_shards, self.prefetch = max(1, int(mix_shards)), max(0, int(prefetch))
        self.identity = online.identity
        if self.rows() < self.batch_size:
            raise OnlineError(f"the train split of the plan holds {self.rows()} rows, fewer than one batch of "
                              f"{self.batch_size}; raise harvest.n_tokens or lower train.batch_size")
        self.max_held_rows = 0
        self._counters = dict.fromkeys(("trainer_wait_s", "model_wait_s", "model_busy_s", "model_tokens"), 0.0)
        self._counting = threading.Lock()  # the model thread and the trainer both add to the counters
        self._open: dict[str, float] = {}  # activity -> when it began, while under way
        self._since = time.perf_counter()

    # --- BatchSource ------------------------------------------------------------------------------------
    def rows(self) -> int:
        return sum(r for k, r in enumerate(self.online.shard_rows) if k not in self.online.plan.eval_shards)

    def view(self, keys: list[str], batch_size: int) -> "ModelSource":
        """The same model and plan, fewer keys, another batch size (at most the train split's rows)."""
        return ModelSource(self.online, keys, min(batch_size, self.rows()), self.seed, self.mix_shards, self.prefetch)

    def describe(self) -> str:
        o = self.online
        return (f"the model {o.loaded.name!r} over the corpus {o.corpus.path!r}, computed online "
                f"(harvest identity {o.identity})")

    def sample(self, n_rows: int) -> dict[str, np.ndarray]:
        """The draw CacheSource.sample makes (batch 0 of a loader seeded seed + 1), computed in this thread."""
        n = min(n_rows, self.rows())
        return self._loader(self._compute_here, n, self.seed + 1, prefetch=0).batch(0)

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch `index` alone, computed in this thread (for checks)."""
        return self._loader(self._compute_here, self.batch_size, self.seed, prefetch=0).batch(index)

    def iterate(self, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches from `start_batch` on; the model computes shards one window ahead in a thread."""
        return self.iterate_slices(start_batch, 1, [0])

    def iterate_slices(self, start_batch: int, slices: int, read: list[int]) -> Iterator[dict[str, np.ndarray]]:
        """The batches CacheSource.iterate_slices gives (the parts of reader slices `read` of `slices`); the
        model computes only those slices' shards."""
        slicing = {"slices": slices, "read": read}
        self._loader(self._compute_here, self.batch_size, self.seed, prefetch=0, **slicing)  # bad slicing fails now
        return self._stream(start_batch, slicing)

    def _stream(self, start_batch: int, slicing: dict) -> Iterator[dict[str, np.ndarray]]:
        stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=self.mix_shards)  # computed shards the loader has not taken
        held = [0]  # rows computed and not yet handed to the loader
        lock = threading.Lock()
        with self._counting:
            self._since, self._open = time.perf_counter(), {}

        def hold(n: int) -> None:
            with lock:
                held[0] += n
                self.max_held_rows = max(self.max_held_rows, held[0])

        def check(_n: int) -> None:
            if stop.is_set():
                raise _Stopped()

        def produce(i: int, keys: list[str]) -> dict[str, np.ndarray]:  # called by the dry loader, in the model thread
            self._begin("model_busy_s")
            arrays = self.online.compute(i, keys, on_batch=check)
            self._end("model_busy_s", model_tokens=self.online.tokens[slice(*self.online._span(i))].size)
            rows = len(arrays[keys[0]])
            hold(rows)
            self._begin("model_wait_s")
            while True:
                check(0)
                try:
                    ready.put((i, arrays), timeout=0.05)
                    break
                except queue.Full:
                    continue
            self._end("model_wait_s")
            return {k: np.empty((rows, 0), np.float32) for k in keys}  # the dry loader needs only the row count

        def take(i: int, keys: list[str]) -> dict[str, np.ndarray]:  # called by the loader's prefetch thread
            while True:
                try:
                    item = ready.get(timeout=0.05)
                    break
                except queue.Empty:
                    if stop.is_set():
                        raise _Stopped() from None
            if isinstance(item, BaseException):
                raise item
            j, arrays = item
            hold(-len(arrays[keys[0]]))
            if j != i:
                raise RuntimeError(f"online source: the model computed shard {j} but the loader asked for shard {i}")
            return arrays

        def run_model() -> None:
            dry = self._loader(produce, self.batch_size, self.seed, prefetch=0, **slicing)
            try:
                for _ in dry.iterate(start_batch):
                    if stop.is_set():
                        return
            except _Stopped:
                return
            except BaseException as e:  # handed to the loader, which hands it to the trainer
                while not stop.is_set():
                    try:
                        ready.put(e, timeout=0.05)
                        return
                    except queue.Full:
                        continue

        thread = threading.Thread(target=run_model, name="online-model", daemon=True)
        thread.start()
        batches = self._loader(take, self.batch_size, self.seed, prefetch=self.prefetch, **slicing).iterate(start_batch)
        try:
            while True:
                self._begin("trainer_wait_s")
                batch = next(batches)
                self._end("trainer_wait_s")
                yield batch
        finally:
            stop.set()
            batches.close()
            thread.join()  # the model is free again before anyone else may use it

    # --- overlap --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Since the last call (or the start of iterate): the share of the time the trainer waited for data
        (`data_wait_frac`), the model waited on a full buffer (`model_wait_frac`) and computed
        (`model_busy_frac`), and the model's tokens per second of that time."""
        with self._counting:
            now = time.perf_counter()
            elapsed = max(now - self._since, 1e-9)
            c, self._counters = self._counters, dict.fromkeys(self._counters, 0.0)
            for k, t0 in self._open.items():  # what is under way counts up to now, the rest in the next interval
                c[k] += now - max(t0, self._since)
            self._since = now
        return {"data_wait_frac": c["trainer_wait_s"] / elapsed, "model_wait_frac": c["model_wait_s"] / elapsed,
                "model_busy_frac": c["model_busy_s"] / elapsed, "model_tokens_per_s": c["model_tokens"] / elapsed}

    def _begin(self, activity: str) -> None:
        with self._counting:
            self._open[activity] = time.perf_counter()

    def _end(self, activity: str, **counts: float) -> None:
        """Add the activity's time since it began (or since the last `stats`, whichever is later)."""
        with self._counting:
            t0 = self._open.pop(activity)
            self._counters[activity] += time.perf_counter() - max(t0, self._since)
            for k, v in counts.items():
                self._counters[k] += v

    def held_rows_bound(self) -> int:
        """The most computed rows the model thread holds ahead of the loader: `mix_shards + 1` shards."""
        return (self.mix_shards + 1) * max(self.online.shard_rows)

    # --- internals ------------------------------------------------------------------------------------
    def _compute_here(self, i: int, keys: list[str]) -> dict[str, np.ndarray]:
        return self.online.compute(i, keys)

    def _loader(self, fetch, batch_size: int, seed: int, prefetch: int, **slicing) -> BatchLoader:
        return BatchLoader(ComputedShards(self.online, fetch), self.keys, batch_size, split="train", seed=seed,
                           mix_shards=self.mix_shards, prefetch=prefetch, **slicing)


# --- the held-out shards, for the eval stage ---------------------------------------------------------------
def held_out_manifest(online: OnlinePlan) -> dict:
    """The manifest of a cache holding only the plan's held-out shards (renumbered 0..; sequence ids too)."""
    loaded, corpus, config, p = online.loaded, online.corpus, online.config, online.plan
    ident = {**online.harvest_identity, HELD_OUT_KEY: {"plan_shards": p.eval_shards, "sequences_per_shard": p.sequences_per_shard}}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "identity": ident,
        "model": {"name": loaded.name, **ident["model"], "n_layers": hv._n_layers(loaded.model)},
        "corpus": {"fingerprint": ident["corpus"]["fingerprint"], "config": dataclasses.asdict(corpus)},
        "context_length": corpus.context_length,
        "hookpoints": {k: {"width": w, "dtype": config.dtype, "kind": "gradient" if k.endswith(hv.GRAD_SUFFIX) else "activation"}
                       for k, w in p.widths.items()},
        "excluded_token_ids": online.rules["excluded_token_ids"],
        "position_rules": online.rules,
        "sequences_per_shard": p.sequences_per_shard,
        "n_shards_planned": len(p.eval_shards),
        "eval_shards": list(range(len(p.eval_shards))),
        HELD_OUT_KEY: {"plan_shards": p.eval_shards, "plan_seq_starts": [k * p.sequences_per_shard for k in p.eval_shards],
                       "note": "only the held-out shards of an online run; the train split is computed by the model"},
        "n_tokens": 0,
        "n_rows": 0,
    }


def write_held_out(online: OnlinePlan, out: str | Path, progress: bool = True) -> ActivationCache:
    """Write (or finish) the cache at `out` holding the plan's held-out shards for the eval stage: the rows a
    full harvest's eval split holds, with shard j holding plan shard eval_shards[j] as sequences
    [j*S, (j+1)*S). Resumable like a harvest; a cache of another config there is refused."""
    out, p = Path(out), online.plan
    if not p.eval_shards:
        raise OnlineError(f"the plan has no held-out shards (harvest.eval_fraction = {online.config.eval_fraction}, "
                          f"{p.n_shards} shard(s)), so the eval stage would have nothing to score; raise "
                          "harvest.eval_fraction (or harvest.n_tokens), or run only the train stage")
    manifest = held_out_manifest(online)
    if not (out / MANIFEST).is_file():
        CacheWriter.check_new_folder(out)
    with FolderLock(out, "an online run's held-out harvest"):
        writer = CacheWriter.create_or_resume(out, manifest)
        if writer.manifest.get("complete"):
            return ActivationCache(out, writer.manifest)
        keys = list(p.widths) + list(ROW_KEYS)
        S = p.sequences_per_shard
        if progress:
            print(f"online: writing the {len(p.eval_shards)} held-out shard(s) of the plan to {out} for the eval stage "
                  "(the train split is computed by the model as training runs)", file=sys.stderr)
        for j in range(writer.n_done, len(p.eval_shards)):
            k = p.eval_shards[j]
            arrays = online.compute(k, keys)
            arrays["seq"] = (arrays["seq"] - k * S + j * S).astype(np.int32)
            seqs = online.sequences(k)
            arrays["sequence_tokens"] = np.stack([s.tokens for s in seqs])
            if online.corpus.mode == "chat":
                arrays["sequence_content"] = np.stack([s.content for s in seqs]).astype(np.int16)
                arrays["sequence_length"] = np.array([s.length for s in seqs], dtype=np.int32)
            info = {"rows": len(arrays["seq"]), "tokens": len(seqs) * p.context_length, "seq_start": j * S,
                    "seq_stop": j * S + len(seqs), "split": "eval", "left_out": online.left_out[k]}
            writer.add_shard(arrays, info)
        shards = writer.manifest["shards"]
        writer.manifest["left_out"] = {r: sum(s["left_out"].get(r, 0) for s in shards) for r in [*LEFT_OUT_RULES, "outliers"]}
        return writer.finish()


def is_held_out_only(cache: ActivationCache) -> bool:
    """True for a cache `write_held_out` wrote (it has no train split)."""
    return HELD_OUT_KEY in cache.manifest
