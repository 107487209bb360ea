"""Join the parts of a multi-process harvest (`<cache>/parts/<i>-of-<n>/`) into the one cache at `<cache>`.

The merge refuses, naming the part and the command that fixes it, unless every part of one process count is
there, finished, and harvested with the same identity (model fingerprint, corpus, harvest options) and plan.
Each part's shard files are hard-linked to their global names in `<cache>` (moved where the file system has
no hard links), the merged manifest (every shard in global order, totals and left-out counts summed) is
checked against the folder, sizes and headers before it is written atomically, and only then are the parts
removed. So a kill at any moment leaves the parts intact or a valid merged cache, and running the merge again
finishes the job; merging a merged cache does nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from dictlearn.activations.cache import MANIFEST, ActivationCache, CacheError, _flatten, shard_name
from dictlearn.activations.processes import PARTS_DIR, existing_parts, part_dir, part_name, shard_range
from dictlearn.files import FolderLock, LockedError, atomic_write_json

MERGED_FROM = "merged_from"  # manifest key of a merged cache: the process count and each part's shard range
# manifest keys every part must share besides the identity: the plan that lays out the global shards
PLAN_KEYS = ("format_version", "context_length", "hookpoints", "position_rules", "sequences_per_shard", "eval_shards")


def _rerun(name: str, index: int, count: int) -> str:
    return (f"part {name}: run `dictlearn harvest CONFIG --process-index {index} --process-count {count}` "
            "with the same config (it resumes where the part stopped)")


def _read_parts(out: Path, count: int) -> tuple[list[dict | None], list[str]]:
    """Each part's manifest (None where unusable) and a sentence per part that is missing or unfinished."""
    manifests: list[dict | None] = []
    problems = []
    for i in range(count):
        name, folder = part_name(i, count), part_dir(out, i, count)
        manifest = None
        if not folder.is_dir():
            problems.append(f"part {name} is missing (no {folder})")
        elif not (folder / MANIFEST).is_file():
            problems.append(f"part {name} has not written its first shard yet")
        else:
            m = ActivationCache.open(folder).manifest
            part = m.get("part") or {}
            if (part.get("index"), part.get("count")) != (i, count):
                problems.append(f"{folder} is not part {name} of a harvest (its manifest says part "
                                f"{part.get('index')}-of-{part.get('count')})")
            elif not m.get("complete"):
                problems.append(f"part {name} is unfinished ({len(m['shards'])} of {m['n_shards_planned']} shards)")
            else:
                manifest = m
        manifests.append(manifest)
    return manifests, problems


def _check_same_harvest(manifests: list[dict], count: int) -> None:
    """Refuse parts that differ in identity or plan, or whose shard range is not their share of the plan."""
    ref = manifests[0]
    for i, m in enumerate(manifests):
        a = _flatten({"identity": ref["identity"], **{k: ref.get(k) for k in PLAN_KEYS},
                      "n_shards_total": ref["part"]["n_shards_total"]})
        b = _flatten({"identity": m["identity"], **{k: m.get(k) for k in PLAN_KEYS},
                      "n_shards_total": m["part"]["n_shards_total"]})
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            shown = "; ".join(f"{k}: part {part_name(0, count)} has {a.get(k)!r}, part {part_name(i, count)} has "
                              f"{b.get(k)!r}" for k in diff[:6])
            raise CacheError(f"part {part_name(i, count)} was harvested with a different config than part "
                             f"{part_name(0, count)} ({shown}); harvest every part with the same config (delete "
                             f"the wrong part and run its `dictlearn harvest ... --process-index {i} "
                             f"--process-count {count}` again)")
        want = shard_range(m["part"]["n_shards_total"], i, count)
        got = (m["part"]["first_shard"], m["part"]["stop_shard"], len(m["shards"]))
        if got != (want.start, want.stop, len(want)):
            raise CacheError(f"part {part_name(i, count)} holds {got[2]} shards from {got[0]} but its share of the plan "
                             f"is shards {want.start}-{want.stop - 1}; delete it and harvest it again")


def _merged_manifest(manifests: list[dict], count: int) -> tuple[dict, list[tuple[Path, str]]]:
    """The merged manifest and the (part file, global name) pairs to put in place."""
    ref = manifests[0]
    shards, moves = [], []
    for i, m in enumerate(manifests):
        for j, entry in enumerate(m["shards"]):
            k = m["part"]["first_shard"] + j
            shards.append({**entry, "file": shard_name(k), "index": k})
            moves.append((Path(part_name(i, count)) / entry["file"], shard_name(k)))
    left_out = {rule: sum((m.get("left_out") or {}).get(rule, 0) for m in manifests) for rule in ref.get("left_out") or {}}
    merged = {k: v for k, v in ref.items() if k not in ("part", "shards", "complete", "left_out")}
    merged.update(n_shards_planned=ref["part"]["n_shards_total"], shards=shards,
                  n_rows=sum(s["rows"] for s in shards), n_tokens=sum(s["tokens"] for s in shards),
                  complete=True, left_out=left_out,
                  **{MERGED_FROM: {"process_count": count, "parts": [
                      {"index": i, "shards": [m["part"]["first_shard"], m["part"]["stop_shard"]]}
                      for i, m in enumerate(manifests)]}})
    return merged, moves


def _place(src: Path, dst: Path) -> None:
    """Give the part's shard file its global name: a hard link (the part stays whole until the merged manifest
    is written), or a move where links are not supported. Done already (a rerun after a kill): nothing."""
    if dst.exists() and (not src.exists() or os.path.samefile(src, dst)):
        return
    tmp = dst.with_name(dst.name + ".tmp-merge")  # a name the cache's folder check treats as an interrupted write
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this file system
        os.replace(src, dst)
        return
    os.replace(tmp, dst)


def is_merged(cache_dir: str | Path) -> bool:
    """Whether `cache_dir` holds a finished merge of parts."""
    try:
        cache = ActivationCache.open(cache_dir)
    except CacheError:
        return False
    return cache.complete and MERGED_FROM in cache.manifest


def merge(cache_dir: str | Path, checksums: bool = False, progress: bool = True) -> ActivationCache:
    """Merge the parts under `<cache_dir>/parts` into the cache at `cache_dir` and remove them; return the cache.
    With `checksums` every shard's sha256 is checked too (otherwise the folder, sizes and headers)."""
    out = Path(cache_dir)
    if not out.is_dir():
        raise CacheError(f"{out} does not exist; give the cache folder the parts were harvested into")
    with FolderLock(out, "a cache merge"), contextlib.ExitStack() as locks:
        if (out / MANIFEST).is_file():
            cache = ActivationCache.open(out)
            if "part" in cache.manifest:
                raise CacheError(f"{out} is one part of a multi-process harvest; merge the cache folder that holds "
                                 f"it: dictlearn cache merge {out.parent.parent}")
            if not (cache.complete and MERGED_FROM in cache.manifest):
                raise CacheError(f"{out} already holds a one-process cache; there is nothing to merge into it "
                                 f"(delete {out / PARTS_DIR} if it holds stale parts)")
            shutil.rmtree(out / PARTS_DIR, ignore_errors=True)  # a merge killed while removing the parts
            return cache
        counts = existing_parts(out)
        if not counts:
            raise CacheError(f"{out} holds no parts to merge (no {out / PARTS_DIR}/<index>-of-<count> folders); a "
                             "multi-process harvest writes them: dictlearn harvest CONFIG --process-index I "
                             "--process-count N")
        if len(counts) > 1:
            raise CacheError(f"{out / PARTS_DIR} mixes parts of harvests with {' and '.join(map(str, sorted(counts)))} "
                             "processes; delete the parts of the layout you abandoned and merge again")
        ((count, _),) = counts.items()
        for i in counts[count]:  # no part may be written while it is merged
            locks.enter_context(FolderLock(part_dir(out, i, count), "a cache merge"))
        manifests, problems = _read_parts(out, count)
        if problems:
            fixes = [_rerun(part_name(i, count), i, count) for i, m in enumerate(manifests) if m is None]
            raise CacheError(f"cannot merge {out}: " + "; ".join(problems) + ". To finish: " + "; ".join(fixes)
                             + f"; then run `dictlearn cache merge {out}`")
        _check_same_harvest(manifests, count)
        merged, moves = _merged_manifest(manifests, count)
        for src, name in moves:
            _place(out / PARTS_DIR / src, out / name)
        cache = ActivationCache(out, merged)
        cache.verify(checksums=checksums)  # before the manifest exists: a failure leaves the parts as they were
        atomic_write_json(out / MANIFEST, merged)
        shutil.rmtree(out / PARTS_DIR)
    if progress:
        print(f"merge: {count} parts -> {out} ({len(cache.shards)} shards, {cache.n_rows:,} rows)", file=sys.stderr)
    return cache


def part_problems(cache_dir: str | Path) -> tuple[int, list[str]] | None:
    """(process count, a sentence per missing or unfinished part) for a folder that holds parts and no merged
    cache; None for any other folder."""
    out = Path(cache_dir)
    counts = existing_parts(out)
    if (out / MANIFEST).is_file() or not counts:
        return None
    count = max(counts)
    return count, _read_parts(out, count)[1]


def unmerged_note(cache_dir: str | Path) -> str | None:
    """A sentence for a cache folder that holds parts but no merged cache yet (None when it is not one)."""
    status = part_problems(cache_dir)
    if status is None:
        return None
    count, problems = status
    state = "; ".join(problems) if problems else f"all {count} parts are complete"
    then = "finish them, then run" if problems else "run"
    return f"{cache_dir} holds the unmerged parts of a {count}-process harvest ({state}): {then} `dictlearn cache merge {cache_dir}`"


def merge_when_complete(cache_dir: str | Path, wait: bool, poll_s: float = 2.0, recheck_s: float = 30.0,
                        say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> ActivationCache | None:
    """Merge if every part is complete (each process calls this after finishing its part, so the last one to
    finish merges; two finishing together are kept apart by the folder lock). Without `wait`, return None when
    some part is unfinished; with it, wait for the merged cache: a cheap check every `poll_s` seconds, and a
    look at the parts (merging if they are all done, e.g. after a process died just before merging) every
    `recheck_s`, printing what it waits for whenever that changes."""
    out, last, next_look = Path(cache_dir), None, 0.0
    while True:
        if (out / MANIFEST).is_file() and is_merged(out):
            return ActivationCache.open(out)
        if time.monotonic() >= next_look:
            next_look = time.monotonic() + recheck_s
            status = part_problems(out)
            if status is None:
                raise CacheError(f"{out} holds neither parts nor a merged cache; run the harvest first")
            note = unmerged_note(out)
            if not status[1]:
                try:
                    return merge(out)
                except LockedError:  # another process merges, or a part's harvest is still letting go of its folder
                    note, next_look = f"{out}: another process is merging the parts", time.monotonic() + poll_s
            if not wait:
                return None
            if note != last:
                say(f"waiting: {note}")
                last = note
        time.sleep(poll_s)
