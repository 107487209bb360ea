"""Which of several cooperating processes this one is, and what share of a harvest it owns.

The cluster's own launcher starts the processes (SLURM's `srun`, `torchrun`, a Kubernetes indexed job, or a
hand-written loop); dictlearn has no scheduler. Each process learns its slot from explicit values, else from
the environment the launcher set: DICTLEARN_PROCESS_INDEX/COUNT (ours, for any launcher), SLURM_PROCID/
SLURM_NTASKS (srun), RANK/WORLD_SIZE (torchrun); with none of them it is the only process, (0, 1).

A multi-process harvest splits the plan's shards into contiguous, disjoint ranges by global shard index, so
every shard (its sequences, its shuffle, its split) is exactly the one a single-process harvest writes, and
each process writes its range as an ordinary cache in `<cache>/parts/<index>-of-<count>/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from dictlearn.config import ConfigError

PARTS_DIR = "parts"
# (index variable, count variable, launcher), in the order they are consulted
ENV_SLOTS = (("DICTLEARN_PROCESS_INDEX", "DICTLEARN_PROCESS_COUNT", "dictlearn"),
             ("SLURM_PROCID", "SLURM_NTASKS", "SLURM"),
             ("RANK", "WORLD_SIZE", "torchrun"))


class ProcessSlotError(ConfigError):
    """A process index or count that cannot be used (missing half, not an integer, out of range)."""


def _as_int(value: str, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ProcessSlotError(f"{name}={value!r} is not an integer; set it to this process's number") from None


def slot_and_source(index: int | None = None, count: int | None = None) -> tuple[int, int, str]:
    """(index, count, where they came from): see `process_slot`."""
    if (index is None) != (count is None):
        raise ProcessSlotError("give both --process-index and --process-count (or neither, to read them from the "
                               "launcher's environment)")
    if index is not None:
        found = (int(index), int(count), "the command line")
    else:
        found = (0, 1, "default (no launcher variables set)")
        for index_var, count_var, launcher in ENV_SLOTS:
            have_index, have_count = index_var in os.environ, count_var in os.environ
            if have_index != have_count:
                missing, present = (count_var, index_var) if have_index else (index_var, count_var)
                raise ProcessSlotError(f"{present} is set but {missing} is not; a {launcher} launch sets both (set "
                                       f"the missing one, or unset {present})")
            if have_index:
                found = (_as_int(os.environ[index_var], index_var), _as_int(os.environ[count_var], count_var),
                         f"{index_var}/{count_var}")
                break
    i, n, source = found
    if n < 1:
        raise ProcessSlotError(f"the process count is {n} (from {source}); it must be at least 1")
    if not 0 <= i < n:
        raise ProcessSlotError(f"the process index is {i} (from {source}) but must be in 0..{n - 1} for a count of {n}")
    return i, n, source


def process_slot(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """(index, count) of this process: the explicit values, else DICTLEARN_PROCESS_INDEX/COUNT, else
    SLURM_PROCID/SLURM_NTASKS, else RANK/WORLD_SIZE, else (0, 1). ProcessSlotError for a bad value."""
    i, n, _ = slot_and_source(index, count)
    return i, n


def shard_range(n_shards: int, index: int, count: int) -> range:
    """The global shard indices process `index` of `count` harvests: a contiguous share, sizes differing by
    at most one (empty when there are more processes than shards)."""
    return range(index * n_shards // count, (index + 1) * n_shards // count)


def part_name(index: int, count: int) -> str:
    return f"{index}-of-{count}"


def part_dir(cache_dir: str | Path, index: int, count: int) -> Path:
    """The folder process `index` of `count` harvests into: `<cache>/parts/<index>-of-<count>`."""
    return Path(cache_dir) / PARTS_DIR / part_name(index, count)


def existing_parts(cache_dir: str | Path) -> dict[int, list[int]]:
    """process count -> sorted indices of the part folders present under `<cache>/parts`."""
    root = Path(cache_dir) / PARTS_DIR
    found: dict[int, list[int]] = {}
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        i, sep, n = p.name.partition("-of-")
        if p.is_dir() and sep and i.isdigit() and n.isdigit():
            found.setdefault(int(n), []).append(int(i))
    return {n: sorted(idx) for n, idx in found.items()}


def check_part_count(cache_dir: str | Path, count: int) -> None:
    """Refuse to mix layouts: a harvest with `count` processes (1: one process writing the cache folder itself)
    where parts written with another count already exist."""
    other = {n: idx for n, idx in existing_parts(cache_dir).items() if n != count}
    if not other:
        return
    root = Path(cache_dir) / PARTS_DIR
    n, idx = max(other.items())
    names = ", ".join(part_name(i, n) for i in idx)
    again = (f"harvest with --process-count {n} and merge (`dictlearn cache merge {cache_dir}`)" if count == 1
             else f"launch {n} processes as before")
    raise ProcessSlotError(f"{root} holds parts of a {n}-process harvest ({names}) but this harvest uses {count} "
                           f"process{'es' if count > 1 else ''}; {again}, or delete {root} to start again")
