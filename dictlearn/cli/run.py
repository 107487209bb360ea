"""`dictlearn run CONFIG.toml`: harvest -> train -> eval (report, feature cards) -> export.

Every stage skips work whose outputs are complete and valid (a verified cache, a saved decomposer,
an evaluated decomposer, an exported folder), so re-running after a crash, or after adding a decomposer
to the config, does only what is missing.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

STAGES = ("harvest", "train", "eval", "export")
_MODULES = {"harvest": "harvest", "train": "train", "eval": "evaluate", "export": "export"}


@dataclass
class RunArgs:
    config: Annotated[Path, tyro.conf.Positional]
    """the run config (TOML)"""
    set: list[str] = field(default_factory=list)
    """config overrides, key.path=value (repeatable)"""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """which stages to run, in order"""


def run(args: RunArgs) -> int:
    from dictlearn.cli.common import out_dir, read_run_config

    data = read_run_config(args.config, args.set)  # fail on a bad config before any work
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"dictlearn run: unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    sets = [a for kv in args.set for a in ("--set", kv)]
    timings = {}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        print(f"== dictlearn run: {stage} ==", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"dictlearn.cli.{_MODULES[stage]}")
        code = int(module.main([str(args.config), *sets]) or 0)
        timings[stage] = time.perf_counter() - start
        if code != 0:
            print(f"dictlearn run: stage {stage} failed (exit {code}); fix it and re-run: finished stages are skipped")
            return code
    total = sum(timings.values())
    print("== dictlearn run: done in " + f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    print(f"outputs in {out_dir(data, args.config)}")
    return 0


def main(argv: list[str]) -> int:
    return run(tyro.cli(RunArgs, args=argv, prog="dictlearn run"))
