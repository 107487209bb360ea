"""`dictlearn run CONFIG.toml`: harvest -> train -> eval (report, feature cards, the [eval.<part>] tables, and
each [[eval.ood]] text scored from its own eval-only harvest in <out_dir>/eval_ood/<label>/) -> export.

With `train.source = "model"` the harvest stage writes only the held-out shards (for eval) and the train stage
runs the model as it trains (dictlearn.activations.online).

Every stage skips work whose outputs are complete and valid (a verified cache, a saved decomposer,
an evaluated decomposer, an exported folder), so re-running after a crash, or after adding a decomposer
to the config, does only what is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import tyro

STAGES = ("harvest", "train", "eval", "export")


@dataclass
class RunArgs:
    config: Annotated[Path, tyro.conf.Positional]
    """the run config (TOML)"""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """config override key.path=value (repeatable: --set a=1 --set b=2)"""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """which stages to run, in order"""


HARVEST_ERRORS = ("dictlearn.config:ConfigError", "dictlearn.activations.cache:CacheError",
                  "dictlearn.activations.corpus:CorpusError", "dictlearn.activations.harvest:HarvestError",
                  "dictlearn.activations.hookpoints:HookpointError", "dictlearn.files:LockedError",
                  "builtins:FileNotFoundError")


def _stages(args: RunArgs) -> tuple[Any, dict[str, tuple[tuple[str, ...], Callable[[], Any]]]]:
    """(the Run, stage -> (the errors it reports as a sentence, the work)): the same stages the subcommands
    run, on one Run object (so the layout, cache and model are resolved once)."""
    from dictlearn.cli import evaluate, export, train
    from dictlearn.cli import harvest
    from dictlearn.run import Run

    run = Run.from_config(args.config, args.set)
    return run, {
        "harvest": (HARVEST_ERRORS, lambda: held_out_stage(run) if run.online
                    else harvest.run(harvest.HarvestArgs(args.config, list(args.set)))),
        "train": (train.ERRORS, lambda: train.train_stage(run)),
        "eval": (evaluate.ERRORS, lambda: evaluate.eval_stage(run)),
        "export": (export.ERRORS, lambda: export.export_stage(run)),
    }


def held_out_stage(run) -> Path:
    """The harvest stage of an online run (train.source = "model"): only the plan's held-out shards are written
    (for the eval stage); the train split is computed by the model as training runs."""
    import json

    from dictlearn.activations.cache import MANIFEST, ActivationCache
    from dictlearn.activations.online import write_held_out

    online = run.online_plan()
    if (run.cache_dir / MANIFEST).is_file():  # a full harvest of the same plan already holds the held-out shards
        cache = ActivationCache.open(run.cache_dir)
        same = json.dumps(cache.manifest.get("identity"), sort_keys=True) == json.dumps(online.harvest_identity, sort_keys=True)
        if cache.complete and same:
            print(f"online: {cache.path} is a full harvest of this plan; the eval stage uses its held-out shards")
            return cache.path
    cache = write_held_out(online, run.cache_dir)
    print(cache.summary())
    return cache.path


def run(args: RunArgs) -> int:
    from dictlearn.cli.common import report_errors

    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"dictlearn run: unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    code = report_errors("dictlearn run", ("dictlearn.config:ConfigError",), lambda: _stages(args))  # a bad config fails first
    if code:
        return code
    run_, stages = _stages(args)
    timings = {}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        print(f"== dictlearn run: {stage} ==", flush=True)
        start = time.perf_counter()
        errors, work = stages[stage]
        code = report_errors(f"dictlearn {stage}", errors, work)
        timings[stage] = time.perf_counter() - start
        if code != 0:
            print(f"dictlearn run: stage {stage} failed (exit {code}); fix it and re-run: finished stages are skipped")
            return code
    total = sum(timings.values())
    print("== dictlearn run: done in " + f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    print(f"outputs in {run_.out_dir}")
    return 0


def main(argv: list[str]) -> int:
    return run(tyro.cli(RunArgs, args=argv, prog="dictlearn run"))
