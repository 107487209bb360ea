"""`dictlearn eval CONFIG.toml [--set key=value]... [--only NAME]... [--force]`

Scores every decomposer saved under `<out_dir>/decomposers/` on the held-out split of the run's cache
(reconstruction, sparsity, spliced-in downstream loss, feature cards, and steering when `[eval.steering]`
is given) and writes `<out_dir>/eval/`: metrics.json, report.md, plots/, feature_cards/, records/. Options
come from the config's `[eval]` table (dictlearn.eval.suite.EvalConfig). A decomposer whose files, cache and
eval options are unchanged since its last evaluation is not evaluated again unless --force is given (the
run's one up-to-date rule, dictlearn.run).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro


@dataclass
class EvalArgs:
    config: Annotated[Path, tyro.conf.Positional]
    """the run config (TOML)"""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """config override key.path=value (repeatable), e.g. --set eval.n_eval_rows=20000"""
    only: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """evaluate only the decomposer with this name (repeatable; overrides eval.decomposers)"""
    force: bool = False
    """evaluate again even where the saved results are up to date"""


def load_saved(run, names: list[str]) -> dict[str, Any]:
    """{name: Decomposer} loaded from the run's folders; an unreadable one names its file and what to do."""
    from dictlearn.config import ConfigError
    from dictlearn.decomposers import base

    out = {}
    for name in names:
        try:
            out[name] = base.load(run.decomposer_dir(name))
        except (ValueError, OSError) as e:
            raise ConfigError(f"decomposer {name!r}: {e}") from None
    return out


def eval_stage(run, only: list[str] | None = None, force: bool = False, log=print) -> dict[str, Any]:
    """The eval stage of `run`: evaluate what is not up to date, then write the report. Returns metrics.json."""
    from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE
    from dictlearn.eval.report import json_safe, write_report
    from dictlearn.eval.suite import RECORD_FORMAT, RECORDS, EvalConfig, evaluate, needs_model, steering_config
    from dictlearn.files import atomic_write_json
    from dictlearn.run import cache_identity, mark_done, up_to_date

    t_start = time.perf_counter()
    cfg = run.section(EvalConfig, "eval")
    if only:
        cfg.decomposers = list(only)
    corpus = str((run.data.get("corpus") or {}).get("path", ""))
    if cfg.steering is not None and not cfg.steering.get("corpus") and corpus.endswith((".jsonl", ".jsonl.gz")):
        cfg.steering = {**cfg.steering, "corpus": corpus}  # the run's labelled corpus judges the steered text
    steer_cfg = steering_config(cfg)  # a bad [eval.steering] fails before any work
    cache = run.open_cache()
    cache.verify(checksums=False)
    names = run.pick_saved(cfg.decomposers, "eval")
    decomposers = load_saved(run, names)
    identity = cache_identity(cache)
    options = {**run.stage_options(cfg, drop=("decomposers", "steering", "torch_threads")), "record_format": RECORD_FORMAT}

    def inputs(name: str) -> dict[str, Any]:
        folder = run.decomposer_dir(name)
        return {"config": folder / CONFIG_FILE, "params": folder / PARAMS_FILE, "cache": identity}

    records_dir = run.eval_dir / RECORDS
    records = {}
    for n in names:
        if not force and up_to_date(records_dir, inputs(n), options, name=n):
            records[n] = json.loads((records_dir / f"{n}.json").read_text())
    if records:
        log(f"eval: reusing the results of {', '.join(records)} (unchanged; --force re-evaluates)")
    todo = {n: d for n, d in decomposers.items() if n not in records}
    model = run.model(cfg.torch_threads) if todo and needs_model(cfg) else None
    fresh = evaluate(todo, model, cache, cfg, cards_dir=run.eval_dir / "feature_cards", log=log)
    for n, record in fresh.items():
        records_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(records_dir / f"{n}.json", json_safe(record))
        mark_done(records_dir, inputs(n), options, [f"{n}.json"], name=n)
        records[n] = json_safe(record)

    steering = None
    if steer_cfg is not None:
        steering = _steering_stage(run, decomposers, inputs, steer_cfg, cache, cfg.torch_threads, force, log)
        for n in records:
            rec = (steering or {}).get("records", {}).get(n)
            records[n]["steering"] = rec.get("summary") if rec else None

    model_name, fingerprint = run.model_reference()
    meta = {"cache": str(cache.path), "model": model_name, "model_fingerprint": fingerprint,
            "n_eval_rows": cfg.n_eval_rows, "eval_config": run.stage_options(cfg),
            "seconds": time.perf_counter() - t_start}
    ordered = [records[n] for n in names]
    write_report(run.eval_dir, meta, ordered, steering=steering)
    log(f"eval: wrote {run.eval_dir / 'metrics.json'} and {run.eval_dir / 'report.md'} in {meta['seconds']:.0f} s")
    return {"meta": meta, "decomposers": ordered}


def _steering_stage(run, decomposers, inputs, steer_cfg, cache, torch_threads, force, log) -> dict[str, Any]:
    """steering.json for every decomposer, reused while no decomposer, the cache or an option changed."""
    import dataclasses

    from dictlearn.eval.report import json_safe
    from dictlearn.eval.steering import evaluate_steering
    from dictlearn.files import atomic_write_json
    from dictlearn.run import mark_done, up_to_date

    folder, path = run.eval_dir, run.eval_dir / "steering.json"
    all_inputs = {f"{n}.{k}": v for n in decomposers for k, v in inputs(n).items()}
    options = json_safe(dataclasses.asdict(steer_cfg))
    if not force and up_to_date(folder, all_inputs, options, name="steering"):
        log("eval: reusing steering.json (unchanged)")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    model = run.model(torch_threads)  # loaded once per run: the reconstruction pass may have loaded it already
    result = evaluate_steering(model.model, model.tokenizer, decomposers, cache, steer_cfg, log=log)
    result = json_safe({**result, "seconds": time.perf_counter() - t0})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    mark_done(folder, all_inputs, options, ["steering.json"], name="steering")
    log(f"eval: steering in {result['seconds']:.0f} s")
    return result


ERRORS = ("dictlearn.config:ConfigError", "dictlearn.activations.cache:CacheError", "dictlearn.eval.suite:EvalError",
          "dictlearn.eval.downstream:DownstreamError", "dictlearn.activations.families:HookpointError",
          "builtins:FileNotFoundError")


def main(argv: list[str]) -> int:
    from dictlearn.cli.common import report_errors
    from dictlearn.run import Run

    args = tyro.cli(EvalArgs, args=argv, prog="dictlearn eval")
    return report_errors("dictlearn eval", ERRORS,
                         lambda: eval_stage(Run.from_config(args.config, args.set), args.only, args.force))
