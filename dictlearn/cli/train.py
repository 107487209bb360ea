"""`dictlearn train CONFIG.toml [--set key=value]... [--only NAME]...`

Trains every `[[decomposers]]` table of a run config on the run's activation cache and writes each to
`<out_dir>/decomposers/<name>/` (the layout: dictlearn.run). Each kind's trainer fits it (all SGD kinds
share one pass over the same batches; semi-NMF has its own solver). A decomposer whose folder holds a
finished, undamaged dictionary trained with the same settings on the same cache is skipped; an interrupted
run resumes from its checkpoints when the same command is run again. One training run at a time may use
a run's decomposers folder.

A `[[decomposers]]` table holds `name`, `kind`, `hookpoint_in` (and `hookpoint_out` for transcoders),
`n_features` or `expansion` (n_features = expansion * d_in), its trainer's options (`lr` for SGD) and the
kind's own hyper-parameters. d_in and d_out come from the cache's hookpoint widths.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro


@dataclass
class TrainArgs:
    config: Annotated[Path, tyro.conf.Positional]
    """the run config (TOML)"""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """config override key.path=value, e.g. --set train.lr=1e-4"""
    only: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """train only the decomposer with this name"""


def _stage_inputs(identity: str) -> dict[str, Any]:
    return {"cache": identity}


def _stage_options(spec, cfg) -> dict[str, Any]:
    return {"decomposer": spec.signature(), "train": cfg.math()}


def is_trained(spec, identity: str, cfg, cache_path: Path) -> bool:
    """True when spec.folder holds this very dictionary, finished and undamaged; False when it must train.

    A finished folder trained with other settings, on another cache, or whose files were damaged is
    refused (never silently reused or overwritten), naming what differs and what to do."""
    from dictlearn.config import ConfigError
    from dictlearn.decomposers import base
    from dictlearn.run import mark_done, read_stamp, stale_reasons
    from dictlearn.trainers.checkpoint import signature_differences
    from dictlearn.trainers.sgd import finished

    if not finished(spec.folder):
        return False
    inputs, options = _stage_inputs(identity), _stage_options(spec, cfg)
    stamp = read_stamp(spec.folder)
    delete = f"delete {spec.folder} and run the same command to train {spec.name!r} again"
    if stamp is None:  # finished before stamps existed (or killed between the save and the stamp)
        try:
            saved = base.load(spec.folder)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{spec.name}: {e}") from None
        if saved.kind != spec.kind:
            raise ConfigError(f"{spec.folder} holds a {saved.kind!r} decomposer, the config asks for {spec.kind!r}; {delete}")
        mark_done(spec.folder, inputs, options, [base.CONFIG_FILE, base.PARAMS_FILE])
        return True
    diff = signature_differences(stamp.get("options", {}), options)
    if diff:
        raise ConfigError(f"{spec.folder} already holds a decomposer {spec.name!r} trained with a different config "
                          f"({'; '.join(diff)}); {delete}, or rename the decomposer")
    reasons = stale_reasons(spec.folder, inputs, options)
    if any(r.startswith("input cache") for r in reasons):
        raise ConfigError(f"{spec.folder} holds {spec.name!r} trained on another activation cache than the one at "
                          f"{cache_path} (identity {identity}); {delete}")
    if reasons:
        raise ConfigError(f"{spec.name}: {'; '.join(reasons)}; {delete}")
    return True


def train_stage(run, only: list[str] | None = None) -> dict[str, Path]:
    """The train stage of `run`: every table not yet trained, with its kind's trainer, under the run's lock.

    Returns name -> folder of what was trained now."""
    from dictlearn.activations.cache import CacheError
    from dictlearn.decomposers import base
    from dictlearn.files import FolderLock
    from dictlearn.run import cache_identity, mark_done
    from dictlearn.trainers import train
    from dictlearn.trainers.data import CacheSource
    from dictlearn.trainers.diskfull import disk_full, is_disk_full
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import finished, train_config
    from dictlearn.trainers.spec import build_spec, check_tables, data_keys

    where = str(run.config_path)
    cfg = train_config(run.data.get("train") or {}, where=f"{where} [train]")
    wandb_cfg = run.section(WandbConfig, "wandb")
    tables = check_tables(run.data.get("decomposers", []), where, list(only or []))
    if cfg.distributed:
        from dictlearn.trainers.sharding import initialize_distributed

        initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    cache = run.open_cache()
    specs = [build_spec(t, cache.hookpoints, run.decomposer_dir(t["name"]), where) for t in tables]
    identity = cache_identity(cache)
    if not all(finished(s.folder) for s in specs):
        try:
            cache.verify()  # a truncated or corrupt shard must not train a dictionary silently
        except CacheError as e:
            raise CacheError(f"refusing to train on the cache at {cache.path}, which does not verify: {e}") from None
    import jax

    # one lock per run; the other processes of a multi-process job work under process 0's (they write no files)
    lock = FolderLock(run.decomposers_dir, "dictlearn train") if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        todo = []
        for spec in specs:
            if is_trained(spec, identity, cfg, cache.path):
                print(f"{spec.name}: already trained in {spec.folder} (delete it to train again)")
            else:
                todo.append(spec)
        if not todo:
            print("dictlearn train: nothing to train")
            return {}
        source = CacheSource(cache, data_keys(todo), cfg.batch_size, cfg.seed)
        result = train(todo, source, cfg, wandb_cfg, log_dir=run.out_dir, output_projection=run.output_projection)
        for spec in todo if jax.process_index() == 0 else []:
            try:
                mark_done(spec.folder, _stage_inputs(identity), _stage_options(spec, cfg), [base.CONFIG_FILE, base.PARAMS_FILE])
            except OSError as e:
                if not is_disk_full(e):
                    raise
                raise disk_full(run.decomposers_dir, f"recording that {spec.name!r} finished",
                                "and records the dictionaries already saved, without training them again.") from None
            print(f"{spec.name}: saved to {spec.folder}")
    return result.folders


ERRORS = ("dictlearn.config:ConfigError", "dictlearn.activations.cache:CacheError",
          "dictlearn.trainers.checkpoint:CheckpointMismatch", "dictlearn.trainers.sgd:NonFiniteLoss",
          "dictlearn.trainers.diskfull:DiskFull", "dictlearn.files:LockedError",
          "dictlearn.activations.families:HookpointError")


def main(argv: list[str]) -> int:
    from dictlearn.cli.common import report_errors
    from dictlearn.run import Run

    args = tyro.cli(TrainArgs, args=argv, prog="dictlearn train")
    return report_errors("dictlearn train", ERRORS, lambda: train_stage(Run.from_config(args.config, args.set), args.only))
