"""Where training batches come from: the activation cache, or arrays in memory.

A source is deterministic in (seed, batch index): `iterate(start)` from batch `start` yields exactly
the batches an uninterrupted run sees from there, which is what makes resuming exact. `sample(n)`
is a separate draw used to estimate input scales and for data-dependent initialisation.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class BatchSource(Protocol):
    keys: list[str]
    batch_size: int
    identity: str | None  # what the rows are, by content (a cache's identity); None: not tracked

    def rows(self) -> int: ...
    def iterate(self, start_batch: int = 0) -> Iterator[Batch]: ...
    def sample(self, n_rows: int) -> Batch: ...
    def view(self, keys: list[str], batch_size: int) -> "BatchSource": ...
    def describe(self) -> str | None: ...


class ArraySource:
    """Rows of in-memory arrays (one per key, same row count), reshuffled every epoch."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must have the same number of rows, got {lengths}")
        self.arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        self.keys = list(arrays)
        self.batch_size = batch_size
        self.seed = seed
        self.n = next(iter(lengths.values()))
        self.identity = None
        if self.n < batch_size:
            raise ValueError(f"{self.n} rows are fewer than one batch of {batch_size}")

    def view(self, keys: list[str], batch_size: int) -> "ArraySource":
        """The same rows, fewer keys, another batch size (at most the row count)."""
        return ArraySource({k: self.arrays[k] for k in keys}, min(batch_size, self.n), self.seed)

    def describe(self) -> str | None:
        return None

    def rows(self) -> int:
        return self.n

    def iterate(self, start_batch: int = 0) -> Iterator[Batch]:
        per_epoch = self.n // self.batch_size
        index = start_batch
        while True:
            epoch, pos = divmod(index, per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            rows = np.sort(order[pos * self.batch_size : (pos + 1) * self.batch_size])
            yield {k: v[rows] for k, v in self.arrays.items()}
            index += 1

    def sample(self, n_rows: int) -> Batch:
        rows = np.random.default_rng([self.seed, 1 << 30]).permutation(self.n)[: min(n_rows, self.n)]
        return {k: v[np.sort(rows)] for k, v in self.arrays.items()}


class CacheSource:
    """Batches of the train split of an activation cache through its BatchLoader (which reads ahead
    on a thread of its own)."""

    def __init__(self, cache, keys: list[str], batch_size: int, seed: int = 0):
        from dictlearn.activations.loader import BatchLoader
        from dictlearn.run import cache_identity

        self.cache, self.keys, self.batch_size, self.seed = cache, list(keys), batch_size, seed
        self.identity = cache_identity(cache)
        self.loader = BatchLoader(cache, keys=self.keys, batch_size=batch_size, split="train", seed=seed)

    def view(self, keys: list[str], batch_size: int) -> "CacheSource":
        """The same cache, fewer keys, another batch size (at most the train split's rows)."""
        return CacheSource(self.cache, keys, min(batch_size, int(self.cache.rows("train"))), self.seed)

    def describe(self) -> str:
        return f"the cache at {self.cache.path} (identity {self.identity})"

    def rows(self) -> int:
        return int(self.loader.rows("train"))

    def iterate(self, start_batch: int = 0) -> Iterator[Batch]:
        for batch in self.loader.iterate(start_batch=start_batch):
            yield {k: batch[k] for k in self.keys}

    def sample(self, n_rows: int) -> Batch:
        from dictlearn.activations.loader import BatchLoader

        n_rows = min(n_rows, self.rows())
        loader = BatchLoader(self.cache, keys=self.keys, batch_size=n_rows, split="train", seed=self.seed + 1)
        return loader.batch(0)

