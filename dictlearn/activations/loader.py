"""Stream shuffled batches of rows from an activation cache, with a background prefetch thread.

Mixing guarantee. Rows reach a batch after two seeded shuffles:
1. at harvest time every shard's rows (all tokens of its `sequences_per_shard` sequences, typically
   hundreds of sequences) are permuted uniformly before the write;
2. each epoch the loader permutes the shard order, groups consecutive shards into windows of
   `mix_shards`, and permutes the union of each window's rows uniformly.
So a batch is a uniform sample without replacement from one window (or the seam of two): it draws from
`mix_shards * sequences_per_shard` sequences, two rows of a batch come from the same sequence no more
often than under uniform sampling from that pool, and the composition changes every epoch.

Determinism: batch b is a function of (cache, split, keys, batch_size, seed, mix_shards, slices, b) only,
so `iterate(start_batch=b)` resumes a training run exactly. An epoch is `rows(split) // batch_size` batches;
the remainder (different rows each epoch) is skipped. Memory stays bounded by two windows in the stored
dtype (the current one and, at a seam, the next) plus `prefetch` batches, whatever the cache size.

Reader slices (several processes, each reading its own rows). With `slices = S` every batch is the
concatenation of S parts of batch_size / S rows; part s comes from slice s, which owns the split's shards
s, s + S, s + 2S, ... and runs the plan above on them alone (its own seeded shard order and windows). A
loader told to `read` some slices opens only their shards, and its batches are those parts, in order; the
parts do not depend on which process reads them, so S slices read by one process or spread over S
processes give the same global batches. An epoch is then the fewest batches any slice holds. S = 1 is
the plan above, batch for batch.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np

from dictlearn.activations.cache import ActivationCache, CacheError, to_float32


class BatchLoader:
    """Batches of `batch_size` rows: dict key -> array ((B, width) float32 for activations and gradients;
    (B,) int32 for `token_id`, `seq`, `pos`)."""

    def __init__(
        self,
        cache: ActivationCache,
        keys: list[str],
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        mix_shards: int = 4,
        prefetch: int = 4,
        as_jax: bool = False,
        verify: bool = False,
        slices: int = 1,
        read: list[int] | None = None,
    ):
        """`verify` checks each shard's sha256 as it is read (one read; see ActivationCache.shard_arrays).
        The folder is always checked against the manifest first, so no shard is silently left out.
        `slices` / `read`: see "Reader slices" above (`read` defaults to every slice).

        `rows_read` and `bytes_read` count what this loader has read from the cache so far."""
        if isinstance(keys, str):
            keys = [keys]
        valid = cache.keys()
        bad = [k for k in keys if k not in valid]
        if bad:
            raise CacheError(f"the cache at {cache.path} has no {', '.join(map(repr, bad))}; it holds: {', '.join(valid)}")
        cache.check_folder()
        self.cache, self.keys, self.batch_size, self.split = cache, list(keys), int(batch_size), split
        self.verify = verify
        self.seed, self.mix_shards, self.prefetch, self.as_jax = seed, max(1, int(mix_shards)), max(0, int(prefetch)), as_jax
        self.shard_ids = cache.shard_ids(split)
        self._shard_rows = {i: cache.shards[i]["rows"] for i in self.shard_ids}
        self.slices, self.read = int(slices), list(range(int(slices)) if read is None else read)
        self._check_slices()
        self.part = self.batch_size // self.slices  # rows each slice gives a batch
        self.slice_shards = [self.shard_ids[s :: self.slices] for s in range(self.slices)]
        slice_rows = [sum(self._shard_rows[i] for i in ids) for ids in self.slice_shards]
        if min(slice_rows) < self.part:
            n, what = min(slice_rows), "" if self.slices == 1 else f" (its smallest reader slice of {self.slices})"
            raise CacheError(f"split {split!r} of {cache.path} has {n} rows{what}, fewer than one batch of {self.part}")
        self.batches_per_epoch = min(n // self.part for n in slice_rows)
        self.rows_read = self.bytes_read = 0

    def _check_slices(self) -> None:
        s = self.slices
        if s < 1 or self.batch_size % s:
            raise CacheError(f"reader slices = {s} must be a positive divisor of batch_size {self.batch_size}")
        if s > 1 and len(self.shard_ids) < s:
            raise CacheError(f"split {self.split!r} of {self.cache.path} has {len(self.shard_ids)} shard(s), fewer than "
                             f"the {s} reader slices (each slice reads whole shards); use fewer slices")
        if not self.read or sorted(set(self.read)) != list(self.read) or not 0 <= self.read[0] <= self.read[-1] < s:
            raise CacheError(f"read = {self.read} must list distinct reader slices in 0..{s - 1}, in increasing order")

    def rows(self, split: str | None = None) -> int:
        return self.cache.rows(split or self.split)

    # --- the deterministic plan ---------------------------------------------------------------------
    def _key(self, s: int, *parts: int) -> list[int]:
        """The seed of one shuffle of slice s (one slice keeps the seeds of the plain plan)."""
        return [self.seed, *parts] if self.slices == 1 else [self.seed, *parts, self.slices, s]

    def _windows(self, epoch: int, s: int) -> list[list[int]]:
        order = np.random.default_rng(self._key(s, epoch)).permutation(self.slice_shards[s])
        return [order[i : i + self.mix_shards].tolist() for i in range(0, len(order), self.mix_shards)]

    def _load_window(self, epoch: int, w: int, shards: list[int], s: int) -> dict[str, np.ndarray]:
        """The window's rows for every key, in stored dtype, permuted."""
        parts = [self.cache.shard_arrays(i, self.keys, verify=self.verify) for i in shards]
        rows = sum(self._shard_rows[i] for i in shards)
        perm = np.random.default_rng(self._key(s, epoch, w, 1)).permutation(rows)
        dest = np.empty_like(perm)
        dest[perm] = np.arange(rows)  # row j of the shards' concatenation goes to dest[j]
        out = {}
        for k in self.keys:
            first = parts[0][k]
            out[k] = np.empty((rows,) + first.shape[1:], dtype=first.dtype)
            offset = 0
            for p in parts:  # one sequential read of each shard, scattered into place
                n = len(p[k])
                out[k][dest[offset : offset + n]] = p[k]
                offset += n
        self.rows_read += rows
        self.bytes_read += sum(v.nbytes for v in out.values())
        return out

    def _row_stream(self, epoch: int, skip: int, s: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive row blocks of slice s in one epoch, starting `skip` rows in."""
        for w, shards in enumerate(self._windows(epoch, s)):
            n = sum(self._shard_rows[i] for i in shards)
            if skip >= n:
                skip -= n
                continue
            data = self._load_window(epoch, w, shards, s)
            yield {k: v[skip:] for k, v in data.items()}
            skip = 0

    def _parts(self, s: int, start_batch: int) -> Iterator[dict[str, np.ndarray]]:
        """Slice s's part of every batch from `start_batch` on, in stored dtype."""
        size = self.part
        epoch, j = divmod(start_batch, self.batches_per_epoch)
        while True:
            stream = self._row_stream(epoch, j * size, s)
            pending: list[dict[str, np.ndarray]] = []
            have = 0
            for _ in range(j, self.batches_per_epoch):
                while have < size:
                    block = next(stream)
                    pending.append(block)
                    have += len(block[self.keys[0]])
                joined = {k: np.concatenate([p[k] for p in pending]) if len(pending) > 1 else pending[0][k] for k in self.keys}
                rest = {k: v[size:] for k, v in joined.items()}
                have -= size
                pending = [rest] if have else []
                yield {k: v[:size] for k, v in joined.items()}
            stream.close()
            epoch, j = epoch + 1, 0

    def _batches(self, start_batch: int) -> Iterator[dict[str, np.ndarray]]:
        parts = [self._parts(s, start_batch) for s in self.read]
        try:
            for pieces in zip(*parts):
                batch = pieces[0] if len(pieces) == 1 else {k: np.concatenate([p[k] for p in pieces]) for k in self.keys}
                yield {k: to_float32(v) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else np.array(v) for k, v in batch.items()}
        finally:
            for p in parts:
                p.close()

    @staticmethod
    def _to_jax(batch: dict[str, np.ndarray]) -> dict:
        import jax

        return {k: jax.device_put(v) for k, v in batch.items()}

    # --- public ----------------------------------------------------------------------------------------
    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch number `index` alone (loads its window; for checks and tests)."""
        gen = self._batches(index)
        try:
            return next(gen)
        finally:
            gen.close()

    def iterate(self, start_batch: int = 0) -> Iterator[dict]:
        """Endless batches from `start_batch` on (epochs reshuffled), prefetched on a background thread
        (`prefetch` batches ahead; 0 reads in the caller's thread)."""
        if self.prefetch == 0:
            for b in self._batches(start_batch):
                yield self._to_jax(b) if self.as_jax else b
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for b in self._batches(start_batch):
                    if not put(self._to_jax(b) if self.as_jax else b):
                        return
            except BaseException as e:  # handed to the consumer
                put(e)
                return
            put(done)

        thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
