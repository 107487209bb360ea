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

With `train.source = "model"` no cache is read: the model computes the rows of the harvest plan as training
runs (dictlearn.activations.online), the widths come from the model's hookpoints, and what the rows are (for
resuming and for the up-to-date rule) is the harvest's identity: model weights, corpus and [harvest] options.
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


def is_trained(spec, identity: str, cfg, cache_path: Path | str) -> bool:
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
        raise ConfigError(f"{spec.folder} holds {spec.name!r} trained on other data than {cache_path} (identity "
                          f"{identity}); {delete}")
    if reasons:
        raise ConfigError(f"{spec.name}: {'; '.join(reasons)}; {delete}")
    return True


def _cache_data(run, cfg):
    """(hookpoints, identity, what the data is, check, make_source) for training on the run's cache."""
    from dictlearn.activations.cache import CacheError
    from dictlearn.activations.online import is_held_out_only
    from dictlearn.config import ConfigError
    from dictlearn.run import cache_identity
    from dictlearn.trainers.data import CacheSource

    cache = run.open_cache()
    if is_held_out_only(cache):
        raise ConfigError(f"the cache at {cache.path} holds only the held-out shards of an online run (no train split); "
                          f'set train.source = "model" to train from the model, or harvest a full cache into another '
                          "folder (train.cache) to train from a cache")
    if not cache.shard_ids("train"):  # harvest.eval_fraction = 1: an eval-only cache
        raise ConfigError(f"the cache at {cache.path} is eval-only (every shard held out, harvest.eval_fraction = 1): "
                          "nothing to train on; harvest with eval_fraction below 1 into another folder (train.cache)")

    # A truncated or corrupt shard must not train a dictionary silently. One process hashes every shard up
    # front; in a multi-process run each process reads only its own shards, so it checks the folder's
    # structure up front and each shard's sha256 as it reads it, instead of reading the whole cache once more.
    hash_on_read = cfg.distributed

    def check() -> None:
        try:
            cache.verify(checksums=not hash_on_read)
        except CacheError as e:
            raise CacheError(f"refusing to train on the cache at {cache.path}, which does not verify: {e}") from None

    return (cache.hookpoints, cache_identity(cache), f"the cache at {cache.path}", check,
            lambda keys: CacheSource(cache, keys, cfg.batch_size, cfg.seed, verify_reads=hash_on_read))


def _model_data(run, cfg):
    """(hookpoints, identity, what the data is, check, make_source) for online training (train.source = "model")."""
    from dictlearn.activations.online import ModelSource
    from dictlearn.config import ConfigError

    if cfg.distributed:
        raise ConfigError('train.source = "model" runs the model inside the one training process; several processes '
                          "cannot share it yet: harvest a cache (several processes may harvest it) and train from it "
                          'with train.source = "cache", or set train.distributed = false')
    online = run.online_plan()
    return (online.hookpoints(), online.identity, f"the model {online.loaded.name!r} online", lambda: None,
            lambda keys: ModelSource(online, keys, cfg.batch_size, cfg.seed))


def train_stage(run, only: list[str] | None = None) -> dict[str, Path]:
    """The train stage of `run`: every table not yet trained, with its kind's trainer, under the run's lock.
    The rows come from the run's cache, or (train.source = "model") from the model as training runs.

    Returns name -> folder of what was trained now."""
    from dictlearn.config import ConfigError
    from dictlearn.decomposers import base
    from dictlearn.files import FolderLock
    from dictlearn.run import mark_done
    from dictlearn.trainers import train
    from dictlearn.trainers.diskfull import disk_full, is_disk_full
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import finished, train_config
    from dictlearn.trainers.spec import build_spec, check_tables, data_keys

    where = str(run.config_path)
    cfg = train_config(run.data.get("train") or {}, where=f"{where} [train]")
    wandb_cfg = run.section(WandbConfig, "wandb")
    tables = check_tables(run.data.get("decomposers", []), where, list(only or []))
    if cfg.distributed and cfg.source == "cache":
        from dictlearn.trainers.sharding import initialize_distributed

        initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    hookpoints, identity, data_where, check, make_source = (_model_data if cfg.source == "model" else _cache_data)(run, cfg)
    try:
        specs = [build_spec(t, hookpoints, run.decomposer_dir(t["name"]), where) for t in tables]
    except ConfigError as e:
        if cfg.source != "model":
            raise
        raise ConfigError(f"{e} (online, the rows are harvest.hookpoints and harvest.gradients, computed by the "
                          "model as training runs)") from None
    if not all(finished(s.folder) for s in specs):
        check()
    import jax

    # one lock per run; the other processes of a multi-process job work under process 0's (they write no files)
    lock = FolderLock(run.decomposers_dir, "dictlearn train") if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        todo = []
        for spec in specs:
            if is_trained(spec, identity, cfg, data_where):
                print(f"{spec.name}: already trained in {spec.folder} (delete it to train again)")
            else:
                todo.append(spec)
        if not todo:
            print("dictlearn train: nothing to train")
            return {}
        source = make_source(data_keys(todo))
        if cfg.source == "model" and cfg.total_steps(source.rows()) * cfg.batch_size > source.rows():
            epochs = cfg.total_steps(source.rows()) * cfg.batch_size / source.rows()
            print(f"online: {epochs:.1f} passes over the plan's {source.rows():,} train rows (harvest.n_tokens); the model "
                  "computes every pass again")
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
          "dictlearn.activations.families:HookpointError", "dictlearn.activations.harvest:HarvestError",
          "dictlearn.activations.corpus:CorpusError")


def main(argv: list[str]) -> int:
    from dictlearn.cli.common import report_errors
    from dictlearn.run import Run

    args = tyro.cli(TrainArgs, args=argv, prog="dictlearn train")
    return report_errors("dictlearn train", ERRORS, lambda: train_stage(Run.from_config(args.config, args.set), args.only))
