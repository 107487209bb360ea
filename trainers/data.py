"""Where training batches come from: the activation cache, or arrays in memory.

A source is deterministic in (seed, batch index): `iterate(start)` from batch `start` yields exactly
the batches an uninterrupted run sees from there, which is what makes resuming exact. `sample(n)`
is a separate draw used to estimate input scales and for data-dependent initialisation.

`mesh_batches` puts them on the device mesh. With `reader_slices` > 1 (a cache source) every process
reads only the slices of each batch that hold its devices' rows (see the loader's "Reader slices").
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

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

    def __init__(self, cache, keys: list[str], batch_size: int, seed: int = 0, verify_reads: bool = False):
        """`verify_reads` checks each shard's sha256 as the loader reads it (one read), for processes that
        read only their own shards and so must not hash the whole cache up front."""
        from dictlearn.activations.loader import BatchLoader
        from dictlearn.run import cache_identity

        self.cache, self.keys, self.batch_size, self.seed = cache, list(keys), batch_size, seed
        self.verify_reads = verify_reads
        self.identity = cache_identity(cache)
        self.loader = BatchLoader(cache, keys=self.keys, batch_size=batch_size, split="train", seed=seed,
                                  verify=verify_reads)
        self.streams: list[Any] = []  # the loaders that served batches (their rows_read / bytes_read)

    def view(self, keys: list[str], batch_size: int) -> "CacheSource":
        """The same cache, fewer keys, another batch size (at most the train split's rows)."""
        return CacheSource(self.cache, keys, min(batch_size, int(self.cache.rows("train"))), self.seed, self.verify_reads)

    def describe(self) -> str:
        return f"the cache at {self.cache.path} (identity {self.identity})"

    def rows(self) -> int:
        return int(self.loader.rows("train"))

    def iterate(self, start_batch: int = 0) -> Iterator[Batch]:
        return self.iterate_slices(start_batch, 1, [0])

    def iterate_slices(self, start_batch: int, slices: int, read: list[int]) -> Iterator[Batch]:
        """Batches made of the parts of reader slices `read` (of `slices`) alone, in order; only their
        shards are read. Checks the slicing now (CacheError), before the first batch is asked for."""
        from dictlearn.activations.loader import BatchLoader

        loader = self.loader if slices == 1 else BatchLoader(
            self.cache, keys=self.keys, batch_size=self.batch_size, split="train", seed=self.seed, slices=slices, read=read,
            verify=self.verify_reads)
        self.streams.append(loader)
        return _only(loader.iterate(start_batch=start_batch), self.keys)

    def reads(self) -> dict[str, int]:
        """Rows and bytes this process has read from the cache for training batches (not the start-up sample)."""
        return {"rows": sum(s.rows_read for s in self.streams), "bytes": sum(s.bytes_read for s in self.streams)}

    def sample(self, n_rows: int) -> Batch:
        from dictlearn.activations.loader import BatchLoader

        n_rows = min(n_rows, self.rows())
        loader = BatchLoader(self.cache, keys=self.keys, batch_size=n_rows, split="train", seed=self.seed + 1,
                             verify=self.verify_reads)
        return loader.batch(0)



def mesh_batches(source: BatchSource, start_batch: int, keys: list[str], batch_sharding, reader_slices: int = 1
                 ) -> Iterator[dict[str, Any]]:
    """The batches from `start_batch` on, each laid out on the mesh as one global array per key.

    reader_slices = 1: every process reads the whole batch and keeps its devices' rows. More: this process
    reads only the slices that hold its devices' rows (`source.iterate_slices`, a cache source); the global
    batches are the same whichever process reads which slice. Bad slicing fails here, not at the first step."""
    from dictlearn.config import ConfigError
    from dictlearn.trainers import sharding

    size = source.batch_size
    if reader_slices < 1 or size % reader_slices:
        raise ConfigError(f"train.reader_slices = {reader_slices} must be a positive divisor of batch_size {size}")
    if reader_slices == 1:
        first, batches = 0, source.iterate(start_batch)
    elif not hasattr(source, "iterate_slices"):
        raise ConfigError(f"train.reader_slices = {reader_slices} needs a source that reads in slices (an activation "
                         f"cache); this one does not ({source.describe() or type(source).__name__}): set reader_slices = 1")
    else:
        part = size // reader_slices
        lo, hi = sharding.process_rows(batch_sharding, size)
        read = list(range(lo // part, -(-hi // part)))
        first, batches = read[0] * part, source.iterate_slices(start_batch, reader_slices, read)
    return _placed(batches, keys, batch_sharding, first, size)


def _placed(batches: Iterator[Batch], keys: list[str], batch_sharding, first: int, size: int) -> Iterator[dict[str, Any]]:
    from dictlearn.trainers import sharding

    try:
        for raw in batches:
            yield sharding.put_batch({k: raw[k] for k in keys}, batch_sharding, first, size)
    finally:
        getattr(batches, "close", lambda: None)()


def _only(batches: Iterator[Batch], keys: list[str]) -> Iterator[Batch]:
    try:
        for batch in batches:
            yield {k: batch[k] for k in keys}
    finally:
        batches.close()  # stops the loader's read-ahead thread now
