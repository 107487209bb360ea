"""`dictlearn cache info DIR`, `dictlearn cache verify DIR [--quick]` and `dictlearn cache merge DIR [--checksums]`.

`info` prints what a cache holds (model, corpus, hookpoints, rows, shards); `verify` checks that the folder
holds exactly the shards the manifest lists (no unlisted shard file, no gap in the numbering or the
sequence ranges, totals that add up), then every shard's size, header and sha256, and names what is
wrong (exit status 1), so a broken cache is caught before training on it. `merge` joins the parts of a
multi-process harvest (`DIR/parts/I-of-N/`) into the cache at DIR, refusing missing, unfinished or
mismatched parts by name; it can be run again at any time (after a kill it finishes, after success it
does nothing).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

USAGE = "usage: dictlearn cache {info,verify,merge} DIR [--quick | --checksums]"


@dataclass
class InfoArgs:
    path: Annotated[str, tyro.conf.Positional]
    """the cache folder (a run's <out_dir>/cache) or an fsspec URL"""


@dataclass
class VerifyArgs:
    path: Annotated[str, tyro.conf.Positional]
    """the cache folder (a run's <out_dir>/cache) or an fsspec URL"""
    quick: bool = False
    """check the folder, sizes and headers only, skipping the sha256 of every shard"""


@dataclass
class MergeArgs:
    path: Annotated[Path, tyro.conf.Positional]
    """the cache folder whose parts/ a multi-process harvest wrote"""
    checksums: bool = False
    """also check every shard's sha256 before the merged manifest is written"""


COMMANDS = {"info": InfoArgs, "verify": VerifyArgs, "merge": MergeArgs}


def _run(command: str, args) -> None:
    from dictlearn.activations.cache import ActivationCache, CacheError
    from dictlearn.activations.merge import merge, unmerged_note

    if command == "merge":
        cache = merge(args.path, checksums=args.checksums)
        print(f"{args.path}: merged ({len(cache.shards)} shards, {cache.n_rows:,} rows"
              + (", checksums match)" if args.checksums else ", folder, sizes and headers checked)"))
        return
    note = unmerged_note(args.path)
    if note is not None:
        raise CacheError(note)
    cache = ActivationCache.open(args.path)
    part = cache.manifest.get("part")
    if part is not None and command == "verify":
        raise CacheError(f"{args.path} is part {part['index']}-of-{part['count']} of a multi-process harvest, not a "
                         f"cache of its own; merge the parts (`dictlearn cache merge {Path(args.path).parent.parent}`, which "
                         "checks them) and verify the merged cache")
    if command == "info":
        print(cache.summary())
        if part is not None:
            print(f"part       {part['index']}-of-{part['count']} of a multi-process harvest: shards "
                  f"{part['first_shard']}-{part['stop_shard'] - 1} of {part['n_shards_total']}")
    else:
        cache.verify(checksums=not args.quick)
        print(f"{args.path}: OK ({len(cache.shards)} shards, {cache.n_rows:,} rows"
              + (", folder, sizes and headers only)" if args.quick else ", folder accounted for, checksums match)"))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"{USAGE}\n\n{__doc__}", file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from dictlearn.activations.cache import CacheError
    from dictlearn.files import LockedError

    command = argv[0]
    args = tyro.cli(COMMANDS[command], args=argv[1:], prog=f"dictlearn cache {command}")
    try:
        _run(command, args)
    except (CacheError, LockedError) as e:
        print(f"dictlearn cache {command}: {e}", file=sys.stderr)
        return 1
    return 0
