"""The eval stage's parts beside the per-decomposer records: steering, sparse probing, absorption and feature
matching (one JSON each in eval/), and the same scores on other text (<out_dir>/eval_ood/<label>/).

Each part is reused while its inputs (the decomposers' files, the cache, the model, the text) and its options
are unchanged: the run's one up-to-date rule (dictlearn.run). `dictlearn eval` (dictlearn.cli.evaluate) runs them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

Log = Callable[[str], None]
PROBE_SCALARS = {"sparse_probe_k1": ("probing", "1"), "sparse_probe_k5": ("probing", "5")}  # record key -> (part, k)


def reused_or_computed(folder: Path, name: str, inputs: dict[str, Any], options: dict[str, Any],
                       compute: Callable[[], dict[str, Any]], force: bool, log: Log,
                       also: tuple[str, ...] = ()) -> dict[str, Any]:
    """<folder>/<name>.json: read back while its inputs and options are unchanged, else computed (its "seconds"
    measured here when the part does not say), written atomically and stamped; `also`: other files the part
    writes (relative to folder), stamped with it where they exist (one deleted or edited: the part runs again)."""
    from dictlearn.eval.report import json_safe
    from dictlearn.files import atomic_write_json
    from dictlearn.run import mark_done, up_to_date

    path = Path(folder) / f"{name}.json"
    if not force and up_to_date(folder, inputs, options, name=name):
        log(f"eval: reusing {name}.json (unchanged)")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    result = compute()
    result = json_safe({**result, "seconds": result.get("seconds", time.perf_counter() - t0)})
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    written = [rel for rel in also if (Path(folder) / rel).is_file()]
    mark_done(folder, inputs, options, [f"{name}.json", *written], name=name)
    log(f"eval: {name} in {result['seconds']:.0f} s")
    return result


def stage_options(config: Any) -> dict[str, Any]:
    from dictlearn.eval.report import json_safe

    return json_safe(dataclasses.asdict(config))


def steering_part(run, decomposers, all_inputs, config, cache, torch_threads: int, force: bool, log: Log) -> dict:
    """eval/steering.json (dictlearn.eval.steering), and every judged continuation side by side in
    eval/steering/ (continuations.jsonl, index.html)."""
    from dictlearn.eval.steering import evaluate_steering

    def compute() -> dict[str, Any]:
        model = run.model(torch_threads)  # loaded once per run: the reconstruction pass may have loaded it already
        t0 = time.perf_counter()
        result = evaluate_steering(model.model, model.tokenizer, decomposers, cache, config, log=log,
                                   out_dir=run.eval_dir / "steering")
        return {**result, "seconds": time.perf_counter() - t0}

    return reused_or_computed(run.eval_dir, "steering", all_inputs, stage_options(config), compute, force, log,
                              also=("steering/continuations.jsonl", "steering/index.html"))


def probing_part(run, decomposers, all_inputs, config, torch_threads: int, force: bool, log: Log) -> dict:
    """eval/probing.json (dictlearn.eval.probing): sparse probing on the run's labelled corpus."""
    from dictlearn.eval.probing import run_probing

    corpus, chat = probing_texts(run)
    inputs = {**all_inputs, "model": model_identity(run), "corpus": by_content(corpus), "chat": by_content(chat)}
    return reused_or_computed(run.eval_dir, "probing", inputs, stage_options(config),
                              lambda: run_probing(run.model(torch_threads), decomposers, config, corpus, chat, log),
                              force, log)


def model_identity(run) -> str | None:
    """The run's model by its weights' fingerprint (its name where the cache has none)."""
    name, fingerprint = run.model_reference()
    return fingerprint or name


def by_content(path: str | None) -> Path | str | None:
    """A local file counts by its content (the up-to-date rule hashes it); anything else by its name."""
    return Path(path) if path and Path(path).is_file() else path


def probing_texts(run) -> tuple[str | None, str | None]:
    """(the run's corpus path, the first chat-mode corpus among its [[eval.ood]] entries, else None): the
    labelled text sparse probing reads (sources and topics; chat vs news)."""
    corpus = (run.data.get("corpus") or {}).get("path")
    chats = [o.get("corpus", {}).get("path") for o in (run.data.get("eval") or {}).get("ood") or []
             if isinstance(o, dict) and (o.get("corpus") or {}).get("mode") == "chat"]
    return (str(corpus) if corpus else None), (str(chats[0]) if chats else None)


def absorption_part(run, decomposers, all_inputs, config, torch_threads: int, force: bool, log: Log) -> dict:
    """eval/absorption.json (dictlearn.eval.absorption): the first-letter absorption rate."""
    from dictlearn.eval.absorption import run_absorption

    inputs = {**all_inputs, "model": model_identity(run)}
    return reused_or_computed(run.eval_dir, "absorption", inputs, stage_options(config),
                              lambda: run_absorption(run.model(torch_threads), decomposers, config, log), force, log)


def matching_part(run, decomposers, all_inputs, config, cache, force: bool, log: Log) -> dict:
    """eval/matching.json (dictlearn.eval.matching): best-match decoder cosines and activation correlations."""
    from dictlearn.eval.matching import run_matching

    return reused_or_computed(run.eval_dir, "matching", all_inputs, stage_options(config),
                              lambda: run_matching(decomposers, cache, run.output_projection, config, log), force, log)


def merge_scalars(records: dict[str, dict[str, Any]], parts: dict[str, dict[str, Any] | None]) -> None:
    """Each record gains sparse_probe_k1, sparse_probe_k5 and absorption_rate (None where the part did not run
    or skipped that decomposer)."""
    for name, record in records.items():
        for key, (part, k) in PROBE_SCALARS.items():
            rec = ((parts.get(part) or {}).get("records") or {}).get(name)
            record[key] = (rec.get("mean") or {}).get(k) if rec else None
        rec = ((parts.get("absorption") or {}).get("records") or {}).get(name)
        record["absorption_rate"] = rec.get("absorption_rate") if rec else None


# --- the same scores on other text -------------------------------------------------------------------------------
def ood_corpus(entry, context_length: int):
    """The entry's corpus table as a CorpusConfig (context_length left out: the run cache's); a local path that
    does not exist, a wrong field or an empty corpus fails here with a sentence."""
    from dictlearn.activations.corpus import CorpusConfig, check_corpus, is_local
    from dictlearn.config import from_dict

    corpus = from_dict(CorpusConfig, {"context_length": context_length, **entry.corpus},
                       where=f"[[eval.ood]] {entry.label!r} corpus")
    if is_local(corpus.path):
        check_corpus(corpus)
    return corpus


def ood_harvest_config(cache, hookpoints: list[str], n_tokens: int):
    """An eval-only harvest (every shard held out) of `hookpoints` with the run cache's storage dtype and
    position rules, so the scores on both texts are measured alike."""
    from dictlearn.activations.harvest import HarvestConfig

    known = {f.name for f in dataclasses.fields(HarvestConfig)} - {"hookpoints", "gradients", "n_tokens", "eval_fraction"}
    run_harvest = (cache.manifest.get("identity") or {}).get("harvest") or {}
    same = {k: v for k, v in run_harvest.items() if k in known}
    return HarvestConfig(hookpoints=list(hookpoints), n_tokens=n_tokens, eval_fraction=1.0, **same)


def ood_cache(loaded, corpus, cache, hookpoints: list[str], n_tokens: int, folder: Path, log: Log):
    """The eval-only cache of this text at `folder`: resumed or reused while the model, corpus and options are
    unchanged (one holding more hookpoints than needed serves too), else harvested again."""
    from dictlearn.activations.cache import MANIFEST, ActivationCache
    from dictlearn.activations.harvest import harvest, identity

    config = ood_harvest_config(cache, hookpoints, n_tokens)
    if (folder / MANIFEST).is_file():
        old = ActivationCache.open(folder).manifest.get("identity") or {}
        held = list((old.get("harvest") or {}).get("hookpoints") or [])
        if set(hookpoints) <= set(held):
            config = ood_harvest_config(cache, held, n_tokens)
        if json.dumps(identity(loaded, corpus, config), sort_keys=True, default=str) != json.dumps(old, sort_keys=True, default=str):
            log(f"eval: {folder} was harvested from another model, text or options; harvesting it again")
            shutil.rmtree(folder)
            config = ood_harvest_config(cache, sorted(set(hookpoints) | set(held)), n_tokens)
    return harvest(loaded, corpus, config, folder)


def ood_part(run, decomposers: dict[str, Any], entry, cfg, cache, force: bool, log: Log) -> dict[str, Any]:
    """Score `decomposers` on the entry's text: <out_dir>/eval_ood/<label>/{cache/, records/, metrics.json};
    returns the report's section {"corpus", "n_tokens", "records", "seconds"}. eval/ is never touched."""
    from dictlearn.eval.reconstruction import site_hookpoints
    from dictlearn.eval.report import json_safe
    from dictlearn.files import atomic_write_json

    t0, cpu0 = time.perf_counter(), time.process_time()
    folder = run.ood_dir(entry.label)
    corpus = ood_corpus(entry, cache.context_length)
    needed = sorted({h for d in decomposers.values() for hps in site_hookpoints(d) for h in hps})
    loaded = run.model(cfg.torch_threads)
    log(f"eval: {entry.label}: {len(decomposers)} decomposer(s) on {entry.n_tokens:,} tokens of {corpus.path}")
    text_cache = ood_cache(loaded, corpus, cache, needed, entry.n_tokens, folder / "cache", log)
    harvest_seconds = time.perf_counter() - t0
    down = cfg.n_downstream_sequences if entry.n_downstream_sequences is None else entry.n_downstream_sequences
    ood_cfg = dataclasses.replace(cfg, n_feature_cards=entry.n_feature_cards, n_downstream_sequences=down, decomposers=[], ood=[],
                                  **{name: None for name in ("steering", "probing", "absorption", "matching")})
    records = scored_records(run, decomposers, text_cache, ood_cfg, folder, force, log, extra={"ood": dataclasses.asdict(entry)})
    model_name, fingerprint = run.model_reference()
    n_tokens = int(text_cache.manifest.get("n_tokens", 0))
    seconds = {"harvest": harvest_seconds, "total": time.perf_counter() - t0,
               "cpu": time.process_time() - cpu0}  # every thread's CPU time: the cost on a busy machine
    meta = {"label": entry.label, "corpus": str(corpus.path), "n_tokens": n_tokens, "cache": str(text_cache.path),
            "model": model_name, "model_fingerprint": fingerprint, "eval_config": run.stage_options(ood_cfg),
            "seconds": seconds}
    ordered = [records[n] for n in decomposers]
    atomic_write_json(folder / "metrics.json", json_safe({"meta": meta, "decomposers": ordered}))
    log(f"eval: {entry.label}: wrote {folder / 'metrics.json'} in {seconds['total']:.0f} s (harvest {harvest_seconds:.0f} s; "
        f"{seconds['cpu']:.0f} CPU-seconds)")
    return {"corpus": str(corpus.path), "n_tokens": n_tokens, "records": ordered, "seconds": seconds["total"]}


def scored_records(run, decomposers: dict[str, Any], cache, cfg, folder: Path, force: bool, log: Log,
                   extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{name: record} of the suite (dictlearn.eval.suite.evaluate) on `cache`'s held-out rows, each kept in
    <folder>/records/<name>.json and reused while the decomposer's files, the cache and the options are unchanged."""
    from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE
    from dictlearn.eval.report import json_safe
    from dictlearn.eval.suite import OPTIONAL_STAGES, RECORD_FORMAT, RECORDS, evaluate, needs_model
    from dictlearn.files import atomic_write_json
    from dictlearn.run import cache_identity, mark_done, up_to_date

    identity = cache_identity(cache)
    drop = ("decomposers", "torch_threads", "ood", *OPTIONAL_STAGES)
    options = {**run.stage_options(cfg, drop=drop), "record_format": RECORD_FORMAT, **json_safe(extra or {})}

    def inputs(name: str) -> dict[str, Any]:
        saved = run.decomposer_dir(name)
        return {"config": saved / CONFIG_FILE, "params": saved / PARAMS_FILE, "cache": identity}

    records_dir = Path(folder) / RECORDS
    records = {n: json.loads((records_dir / f"{n}.json").read_text()) for n in decomposers
               if not force and up_to_date(records_dir, inputs(n), options, name=n)}
    if records:
        log(f"eval: reusing the results of {', '.join(records)} in {records_dir} (unchanged; --force re-evaluates)")
    todo = {n: d for n, d in decomposers.items() if n not in records}
    model = run.model(cfg.torch_threads) if todo and needs_model(cfg) else None
    for n, record in evaluate(todo, model, cache, cfg, cards_dir=Path(folder) / "feature_cards", log=log).items():
        records_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(records_dir / f"{n}.json", json_safe(record))
        mark_done(records_dir, inputs(n), options, [f"{n}.json"], name=n)
        records[n] = json_safe(record)
    return records


def decomposer_inputs(run, names: list[str], cache) -> dict[str, Any]:
    """Every named decomposer's files and the cache's identity: the inputs of a part over all of them."""
    from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE
    from dictlearn.run import cache_identity

    identity = cache_identity(cache)
    out: dict[str, Any] = {}
    for n in names:
        saved = run.decomposer_dir(n)
        out.update({f"{n}.config": saved / CONFIG_FILE, f"{n}.params": saved / PARAMS_FILE, f"{n}.cache": identity})
    return out


def comparison_lines(in_records: dict[str, dict], ood_records: list[dict], label: str) -> list[str]:
    """A plain table of FVU and CE score in distribution (eval/records, when evaluated) beside `label`."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    head = f"{'decomposer':<14} {'FVU':>8} {'FVU ' + label:>16} {'CE score':>9} {'CE ' + label:>16}"
    lines = [head]
    for r in ood_records:
        home = in_records.get(r["name"], {})
        lines.append(f"{r['name']:<14} {fmt(home.get('fvu')):>8} {fmt(r.get('fvu')):>16} "
                     f"{fmt(home.get('ce_loss_score')):>9} {fmt(r.get('ce_loss_score')):>16}")
    return lines
