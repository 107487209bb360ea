"""Fault injection: SIGKILL `dictlearn harvest` and `dictlearn train` at random moments, rerun each to
completion, and compare with runs that were never interrupted.

Reports, for the cache, rows lost, duplicated or extra and rows whose stored values differ (matched on
(sequence, position), so a shard reordering cannot hide a loss), and shards whose sha256 differs; for
training, the largest absolute difference of any saved parameter. The figures to keep are 0 and 0.0.

Kills land at random moments of the work, not of the start-up: after each launch the script waits until
the run makes progress (a new shard listed, or a new checkpoint or log line), then waits a random time
drawn uniformly from [0, the reference run's mean time between two such events] and sends SIGKILL, so kills
fall inside shard writes, manifest writes, checkpoint writes and plain compute alike.

    .venv/bin/python bench/fault_injection.py --kills 8          # real SmolLM2, small n_tokens; a few minutes

Exit status 0 when nothing was lost, duplicated or changed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DICTLEARN_ASSETS", ROOT.parent / "shared" / "assets"))
HOOKPOINT = "resid_post.10"
DECOMPOSER = "topk"

CONFIG = """\
out_dir = "{out}"
[model]
name = "{assets}/SmolLM2-135M-Instruct.Q4_1.gguf"
[corpus]
path = "{assets}/english-corpus.jsonl.gz"
context_length = 128
[harvest]
hookpoints = ["{hookpoint}"]
n_tokens = {n_tokens}
dtype = "bfloat16"
batch_size = 8
shard_mb = {shard_mb}
eval_fraction = 0.1
[train]
batch_size = 256
n_steps = {steps}
lr = 1e-3
warmup_steps = 10
log_every = {every}
checkpoint_every = {every}
sample_tokens = 2048
progress = false
[wandb]
mode = "disabled"
[[decomposers]]
name = "{decomposer}"
kind = "topk"
hookpoint_in = "{hookpoint}"
expansion = 2
k = 16
"""


def write_config(path: Path, out: Path, args: argparse.Namespace) -> Path:
    # 8 sequences of 128 tokens per shard (one batch): (576 * 2 + 12) bytes a row
    shard_mb = 8 * 128 * (576 * 2 + 12) / 1e6 + 0.01
    path.write_text(CONFIG.format(out=out, assets=ASSETS, hookpoint=HOOKPOINT, decomposer=DECOMPOSER, shard_mb=shard_mb,
                                  n_tokens=args.n_tokens, steps=args.steps, every=args.checkpoint_every))
    return path


def env(work: Path) -> dict[str, str]:
    # one thread count for every run, so uninterrupted and resumed runs compute alike; a shared compilation
    # cache so a rerun does not spend its time compiling the training step again
    return {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
            "JAX_COMPILATION_CACHE_DIR": str(work / "xla-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def command(stage: str, config: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("dictlearn")), stage, str(config)]


# --- progress: what changes on disk as a run works ----------------------------------------------------------------
def harvest_progress(out: Path) -> int:
    """Shards the cache's manifest lists."""
    try:
        return len(json.loads((out / "cache" / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def train_progress(out: Path) -> int:
    """Checkpoint entries plus log lines of the decomposer under training."""
    folder = out / "decomposers" / DECOMPOSER
    ck = folder / "checkpoints"
    n = len(list(ck.iterdir())) if ck.is_dir() else 0
    log = folder / "train_log.jsonl"
    try:
        n += log.read_bytes().count(b"\n")
    except OSError:
        pass
    return n


PROGRESS = {"harvest": harvest_progress, "train": train_progress}


def run_uninterrupted(stage: str, config: Path, out: Path, work: Path, log) -> float:
    """Run to completion; return the mean seconds between two progress events (the kill window)."""
    proc = subprocess.Popen(command(stage, config), env=env(work), stdout=log, stderr=log)
    seen, times = PROGRESS[stage](out), []
    while proc.poll() is None:
        now = PROGRESS[stage](out)
        if now != seen:
            seen, times = now, times + [time.time()]
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted `dictlearn {stage}` failed (rc {proc.returncode}); see {log.name}")
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 1.0


def run_with_kills(stage: str, config: Path, out: Path, work: Path, kills: int, window: float, rng: random.Random,
                   log) -> list[dict]:
    """Launch, kill at a random moment after the run makes progress, `kills` times; then run to completion."""
    events = []
    while len(events) < kills:
        proc = subprocess.Popen(command(stage, config), env=env(work), stdout=log, stderr=log)
        start = PROGRESS[stage](out)
        while proc.poll() is None and PROGRESS[stage](out) == start:
            time.sleep(0.01)
        delay = rng.uniform(0, window)
        deadline = time.time() + delay
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is not None:  # it finished first: nothing left to interrupt
            print(f"  {stage}: the run finished before kill {len(events) + 1}", file=sys.stderr)
            if proc.returncode != 0:
                raise SystemExit(f"`dictlearn {stage}` failed (rc {proc.returncode}) while being interrupted; see {log.name}")
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        events.append({"stage": stage, "after_progress_s": round(delay, 3)})
        print(f"  {stage}: kill {len(events)}, {delay:.2f} s after this launch's first progress", file=sys.stderr)
    rc = subprocess.run(command(stage, config), env=env(work), stdout=log, stderr=log).returncode
    if rc != 0:
        raise SystemExit(f"the rerun of `dictlearn {stage}` after {len(events)} kills failed (rc {rc}); see {log.name}")
    return events


# --- comparisons -------------------------------------------------------------------------------------------------
def compare_caches(ref_path: Path, got_path: Path) -> dict:
    """Rows lost / duplicated / extra / changed, matched on (sequence, position), and shards whose sha256 differs."""
    from dictlearn.activations.cache import ActivationCache, to_float32

    ref, got = ActivationCache.open(ref_path), ActivationCache.open(got_path)
    ref.verify(), got.verify()

    def rows(cache):
        parts = [cache.shard_arrays(k, [HOOKPOINT, "seq", "pos"]) for k in range(len(cache.shards))]
        key = np.concatenate([p["seq"].astype(np.int64) * cache.context_length + p["pos"] for p in parts])
        return key, np.concatenate([to_float32(p[HOOKPOINT]) for p in parts])

    (rk, rv), (gk, gv) = rows(ref), rows(got)
    uniq, first, counts = np.unique(gk, return_index=True, return_counts=True)
    common, ri, gi = np.intersect1d(rk, uniq, return_indices=True)
    changed = int(np.sum(np.any(rv[ri] != gv[first[gi]], axis=1)))
    return {
        "rows_reference": int(len(rk)), "rows_resumed": int(len(gk)),
        "rows_lost": int(len(np.setdiff1d(rk, uniq))), "rows_duplicated": int(np.sum(counts - 1)),
        "rows_extra": int(len(np.setdiff1d(uniq, rk))), "rows_changed": changed,
        "shards_differing": sum(a["sha256"] != b["sha256"] for a, b in zip(ref.shards, got.shards))
        + abs(len(ref.shards) - len(got.shards)),
    }


def compare_params(ref_dir: Path, got_dir: Path) -> dict:
    from safetensors.numpy import load_file

    a, b = load_file(ref_dir / "params.safetensors"), load_file(got_dir / "params.safetensors")
    if a.keys() != b.keys():
        return {"max_param_diff": float("inf"), "params": sorted(a)}
    diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0 for k in a)
    return {"max_param_diff": diff, "params": sorted(a), "n_values": int(sum(v.size for v in a.values()))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=8, help="SIGKILLs in all, half for harvest and half for train")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--n-tokens", type=int, default=12288, help="harvest size (8 sequences of 128 tokens a shard)")
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (and log lines)")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    if not (ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        print(f"fault_injection: the shared assets are missing under {ASSETS}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="dictlearn-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    kills = {"harvest": (args.kills + 1) // 2, "train": args.kills // 2}
    ref_out, got_out = work / "uninterrupted", work / "killed"
    ref_cfg, got_cfg = write_config(work / "uninterrupted.toml", ref_out, args), write_config(work / "killed.toml", got_out, args)
    t0 = time.time()
    events, report = [], {"kills_requested": kills}
    with open(work / "runs.log", "a") as log:
        for stage in ("harvest", "train"):
            print(f"{stage}: the uninterrupted run", file=sys.stderr)
            window = run_uninterrupted(stage, ref_cfg, ref_out, work, log)
            print(f"{stage}: {kills[stage]} kills (window {window:.2f} s), then a rerun to completion", file=sys.stderr)
            events += run_with_kills(stage, got_cfg, got_out, work, kills[stage], window, rng, log)
    report["kills"] = events
    report["cache"] = compare_caches(ref_out / "cache", got_out / "cache")
    report["train"] = compare_params(ref_out / "decomposers" / DECOMPOSER, got_out / "decomposers" / DECOMPOSER)
    report["seconds"] = round(time.time() - t0, 1)
    c, t = report["cache"], report["train"]
    n_h = sum(e["stage"] == "harvest" for e in events)
    print(f"\nfault injection: {len(events)} SIGKILLs ({n_h} harvest, {len(events) - n_h} train), "
          f"every run resumed to completion ({report['seconds']} s)")
    print(f"cache:  {c['rows_resumed']:,} rows vs {c['rows_reference']:,} uninterrupted; lost {c['rows_lost']}, "
          f"duplicated {c['rows_duplicated']}, extra {c['rows_extra']}, changed {c['rows_changed']}; "
          f"shards differing {c['shards_differing']}")
    print(f"train:  max |parameter difference| vs uninterrupted {t['max_param_diff']} "
          f"over {t.get('n_values', 0):,} values ({', '.join(t['params'])})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    ok = (c["rows_lost"] == c["rows_duplicated"] == c["rows_extra"] == c["rows_changed"] == c["shards_differing"] == 0
          and t["max_param_diff"] == 0.0 and len(events) == args.kills)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
