"""`dictlearn cache info DIR` and `dictlearn cache verify DIR [--quick]`.

`info` prints what a cache holds (model, corpus, hookpoints, rows, shards); `verify` checks that the folder
holds exactly the shards the manifest lists (no unlisted shard file, no gap in the numbering or the
sequence ranges, totals that add up), then every shard's size, header and sha256, and names what is
wrong (exit status 1), so a broken cache is caught before training on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

USAGE = "usage: dictlearn cache {info,verify} DIR [--quick]"


@dataclass
class InfoArgs:
    path: Annotated[Path, tyro.conf.Positional]
    """the cache folder (a run's <out_dir>/cache)"""


@dataclass
class VerifyArgs:
    path: Annotated[Path, tyro.conf.Positional]
    """the cache folder (a run's <out_dir>/cache)"""
    quick: bool = False
    """check the folder, sizes and headers only, skipping the sha256 of every shard"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("info", "verify"):
        print(f"{USAGE}\n\n{__doc__}", file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from dictlearn.activations.cache import ActivationCache, CacheError

    command = argv[0]
    args = tyro.cli(InfoArgs if command == "info" else VerifyArgs, args=argv[1:], prog=f"dictlearn cache {command}")
    try:
        cache = ActivationCache.open(args.path)
        if command == "info":
            print(cache.summary())
        else:
            cache.verify(checksums=not args.quick)
            print(f"{args.path}: OK ({len(cache.shards)} shards, {cache.n_rows:,} rows"
                  + (", folder, sizes and headers only)" if args.quick else ", folder accounted for, checksums match)"))
    except CacheError as e:
        print(f"dictlearn cache {command}: {e}", file=sys.stderr)
        return 1
    return 0
