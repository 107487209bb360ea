"""`dictlearn eval CONFIG.toml [--set key=value]... [--only NAME]... [--force] [--corpus PATH [--label L] [--n-tokens N]]`

Scores every decomposer saved under `<out_dir>/decomposers/` on the held-out split of the run's cache
(reconstruction, sparsity, spliced-in downstream loss, feature cards; steering, sparse probing, absorption and
feature matching when their `[eval.<part>]` tables are given) and writes `<out_dir>/eval/`: metrics.json,
report.md, plots/, feature_cards/, records/, <part>.json. Each `[[eval.ood]]` entry scores them on another
text as well (<out_dir>/eval_ood/<label>/; the report shows both). Options come from the config's `[eval]`
table (dictlearn.eval.suite.EvalConfig). What is unchanged since its last evaluation (files, cache, options) is
not evaluated again unless --force is given (the run's one up-to-date rule, dictlearn.run).

With --corpus, only that text is scored (a fresh eval-only harvest of it, the run's model, hookpoints and
dtype) into <out_dir>/eval_ood/<label>/, printed beside the in-distribution scores; eval/ is left alone.
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
    """config override key.path=value (repeatable), e.g. --set eval.n_eval_rows=20000 or --set eval.steering=false"""
    only: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """evaluate only the decomposer with this name (repeatable; overrides eval.decomposers)"""
    force: bool = False
    """evaluate again even where the saved results are up to date"""
    corpus: str | None = None
    """score the saved dictionaries on this text instead (a fresh eval-only harvest in <out_dir>/eval_ood/<label>/;
    eval/ is left alone)"""
    label: str | None = None
    """the name of that text's folder and column (default: the corpus file's name up to its first dot)"""
    n_tokens: int = 16_384
    """tokens of that text to harvest and score"""
    mode: str | None = None
    """that text's corpus mode: packed or chat (default: packed; chat reads the "messages" field)"""
    text_field: str | None = None
    """that text's JSON field (default: "text" packed, "messages" chat)"""


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
    """The eval stage of `run`: evaluate what is not up to date (records, then each [eval.<part>] table and each
    [[eval.ood]] text), then write the report. Returns metrics.json."""
    from dictlearn.cli import eval_stages as parts
    from dictlearn.eval.report import write_report
    from dictlearn.eval.suite import EvalConfig, stage_config

    t_start = time.perf_counter()
    cfg = run.section(EvalConfig, "eval")
    if only:
        cfg.decomposers = list(only)
    corpus = str((run.data.get("corpus") or {}).get("path", ""))
    if cfg.steering is not None and not cfg.steering.get("corpus") and corpus.endswith((".jsonl", ".jsonl.gz")):
        cfg.steering = {**cfg.steering, "corpus": corpus}  # the run's labelled corpus judges the steered text
    configs = {name: stage_config(cfg, name) for name in ("steering", "probing", "absorption", "matching")}  # bad tables fail first
    cache = run.open_cache()
    cache.verify(checksums=False)
    names = run.pick_saved(cfg.decomposers, "eval")
    decomposers = load_saved(run, names)
    for entry in cfg.ood:  # a bad path or field fails before any work
        parts.ood_corpus(entry, cache.context_length)

    records = parts.scored_records(run, decomposers, cache, cfg, run.eval_dir, force, log)
    all_inputs = parts.decomposer_inputs(run, names, cache)
    threads = cfg.torch_threads
    results: dict[str, Any] = {}
    if configs["steering"] is not None:
        results["steering"] = parts.steering_part(run, decomposers, all_inputs, configs["steering"], cache, threads, force, log)
        for n in records:
            rec = (results["steering"] or {}).get("records", {}).get(n)
            records[n]["steering"] = rec.get("summary") if rec else None
    if configs["probing"] is not None:
        results["probing"] = parts.probing_part(run, decomposers, all_inputs, configs["probing"], threads, force, log)
    if configs["absorption"] is not None:
        results["absorption"] = parts.absorption_part(run, decomposers, all_inputs, configs["absorption"], threads, force, log)
    if configs["matching"] is not None:
        results["matching"] = parts.matching_part(run, decomposers, all_inputs, configs["matching"], cache, force, log)
    parts.merge_scalars(records, results)
    ood = {entry.label: parts.ood_part(run, decomposers, entry, cfg, cache, force, log) for entry in cfg.ood}

    model_name, fingerprint = run.model_reference()
    meta = {"cache": str(cache.path), "model": model_name, "model_fingerprint": fingerprint,
            "n_eval_rows": cfg.n_eval_rows, "eval_config": run.stage_options(cfg),
            "seconds": time.perf_counter() - t_start,
            "part_seconds": {k: (v or {}).get("seconds") for k, v in {**results, **ood}.items()}}
    ordered = [records[n] for n in names]
    sections = {k: results.get(k) for k in ("probing", "absorption", "matching")}
    write_report(run.eval_dir, meta, ordered, steering=results.get("steering"), sections={**sections, "ood": ood or None})
    log(f"eval: wrote {run.eval_dir / 'metrics.json'} and {run.eval_dir / 'report.md'} in {meta['seconds']:.0f} s")
    return {"meta": meta, "decomposers": ordered}


def ood_only_stage(run, args: EvalArgs, log=print) -> dict[str, Any]:
    """`dictlearn eval CONFIG --corpus PATH`: the saved dictionaries scored on that text alone, in
    <out_dir>/eval_ood/<label>/, printed beside the in-distribution scores when eval/ has them (eval/ untouched)."""
    from dictlearn.cli import eval_stages as parts
    from dictlearn.config import ConfigError, from_dict
    from dictlearn.eval.suite import RECORDS, EvalConfig, OodConfig

    cfg = run.section(EvalConfig, "eval")
    if args.only:
        cfg.decomposers = list(args.only)
    table = {"path": args.corpus, **({"mode": args.mode} if args.mode else {}), **({"field": args.text_field} if args.text_field else {})}
    label = args.label or Path(args.corpus.rstrip("/")).name.split(".")[0] or "ood"
    entry = from_dict(OodConfig, {"label": label, "corpus": table, "n_tokens": args.n_tokens}, where="--corpus")
    cache = run.open_cache()
    cache.verify(checksums=False)
    parts.ood_corpus(entry, cache.context_length)  # a bad path or field fails before any work
    names = run.pick_saved(cfg.decomposers, "eval")
    section = parts.ood_part(run, load_saved(run, names), entry, cfg, cache, args.force, log)
    home = {}
    for n in names:
        path = run.eval_dir / RECORDS / f"{n}.json"
        if path.is_file():
            try:
                home[n] = json.loads(path.read_text())
            except ValueError:
                raise ConfigError(f"{path} is not valid JSON; run `dictlearn eval {run.config_path}` again") from None
    log("\n".join(parts.comparison_lines(home, section["records"], label)))
    return section


ERRORS = ("dictlearn.config:ConfigError", "dictlearn.activations.cache:CacheError", "dictlearn.eval.suite:EvalError",
          "dictlearn.eval.downstream:DownstreamError", "dictlearn.activations.families:HookpointError",
          "dictlearn.activations.corpus:CorpusError", "dictlearn.activations.harvest:HarvestError",
          "dictlearn.files:LockedError", "builtins:FileNotFoundError")


def main(argv: list[str]) -> int:
    from dictlearn.cli.common import report_errors
    from dictlearn.run import Run

    args = tyro.cli(EvalArgs, args=argv, prog="dictlearn eval")
    if args.corpus:
        return report_errors("dictlearn eval", ERRORS, lambda: ood_only_stage(Run.from_config(args.config, args.set), args))
    return report_errors("dictlearn eval", ERRORS,
                         lambda: eval_stage(Run.from_config(args.config, args.set), args.only, args.force))
