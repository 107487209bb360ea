"""`dictlearn train CONFIG.toml [--set key=value]... [--only NAME]...`

Trains every `[[decomposers]]` table of a run config on its activation cache (`<out_dir>/cache`, or
`train.cache`) and writes each to `<out_dir>/decomposers/<name>/`. All SGD decomposers share one pass
over the same batches; semi-NMF tables (`kind = "snmf"`) go to their own solver. A decomposer whose
folder already holds a saved dictionary is skipped; an interrupted run resumes from its checkpoints
when the same command is run again.

A `[[decomposers]]` table holds `name`, `kind`, `hookpoint_in` (and `hookpoint_out` for transcoders),
`n_features` or `expansion` (n_features = expansion * d_in), an optional `lr`, and the kind's own
hyper-parameters. d_in and d_out come from the cache's hookpoint widths.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

TRAINER_KEYS = ("name", "kind", "expansion", "lr")  # read by the trainer; the rest is the kind's config
SNMF_KIND = "snmf"


@dataclass
class TrainArgs:
    config: Annotated[Path, tyro.conf.Positional]
    """the run config (TOML)"""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """config override key.path=value, e.g. --set train.lr=1e-4"""
    only: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """train only the decomposer with this name"""


def load_kinds() -> dict[str, type]:
    """Every registered decomposer kind (importing the package registers them)."""
    import dictlearn.decomposers  # noqa: F401
    from dictlearn.decomposers import base

    return base.REGISTRY


def decomposer_tables(data: dict[str, Any], where: str, only: list[str]) -> list[dict[str, Any]]:
    """The `[[decomposers]]` tables to train, each with a unique, valid name and a kind."""
    from dictlearn.config import ConfigError
    from dictlearn.trainers.sgd import NAME_RE

    tables = data.get("decomposers", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: `decomposers` must be a list of [[decomposers]] tables")
    if not tables:
        raise ConfigError(f"{where}: no [[decomposers]] tables; add one with name, kind, hookpoint_in and expansion")
    names = []
    for i, t in enumerate(tables):
        for key in ("name", "kind"):
            if not isinstance(t.get(key), str) or not t[key]:
                raise ConfigError(f"{where}: [[decomposers]] table {i} needs a `{key}` string")
        if not NAME_RE.fullmatch(t["name"]):
            raise ConfigError(f"{where}: decomposer name {t['name']!r} must be a plain folder name (letters, digits, . _ -)")
        names.append(t["name"])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: decomposer names must be unique; repeated: {', '.join(dupes)}")
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only {', '.join(unknown)}: no such decomposer; the config has {', '.join(names)}")
    return [t for t in tables if not only or t["name"] in only]


def build_spec(table: dict[str, Any], hookpoints: dict[str, dict], folder: Path, where: str):
    """A DecomposerSpec from one table, with d_in/d_out from the cache and n_features from `expansion`."""
    from dictlearn.config import ConfigError, from_dict
    from dictlearn.trainers.sgd import DecomposerSpec

    kinds = load_kinds()
    name, kind = table["name"], table["kind"]
    where = f"{where} [[decomposers]] {name!r}"
    if kind not in kinds:
        raise ConfigError(f"{where}: unknown kind {kind!r}; kinds are {', '.join(sorted([*kinds, SNMF_KIND]))}")
    cls = kinds[kind]
    rest = {k: v for k, v in table.items() if k not in TRAINER_KEYS}
    activations = sorted(k for k, v in hookpoints.items() if not k.endswith("@grad"))
    hp_in = rest.get("hookpoint_in")
    if not hp_in:
        raise ConfigError(f"{where}: needs `hookpoint_in`; the cache holds {', '.join(activations)}")
    hp_out = rest.get("hookpoint_out") or hp_in
    for hp in (hp_in, hp_out):
        if hp not in hookpoints:
            raise ConfigError(f"{where}: the cache has no hookpoint {hp!r}; it holds {', '.join(activations)}")
    widths = {"d_in": hookpoints[hp_in]["width"], "d_out": hookpoints[hp_out]["width"]}
    for key, width in widths.items():
        if rest.get(key) not in (None, width):
            raise ConfigError(f"{where}: {key} = {rest[key]} but the cache's {hp_in if key == 'd_in' else hp_out} has width {width}")
        rest[key] = width
    if ("expansion" in table) == ("n_features" in rest):
        raise ConfigError(f"{where}: give exactly one of `expansion` (n_features = expansion * d_in) and `n_features`")
    if "expansion" in table:
        expansion = table["expansion"]
        if not isinstance(expansion, (int, float)) or isinstance(expansion, bool) or expansion <= 0:
            raise ConfigError(f"{where}: expansion must be a positive number, got {expansion!r}")
        rest["n_features"] = int(round(expansion * widths["d_in"]))
    lr = table.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0):
        raise ConfigError(f"{where}: lr must be a positive number, got {lr!r}")
    try:
        config = from_dict(cls.config_cls, rest, where=where)
    except ConfigError as e:
        raise ConfigError(f"{e} (plus the trainer's keys {', '.join(TRAINER_KEYS)})") from None
    if config.needs_grad and f"{hp_out}@grad" not in hookpoints:
        raise ConfigError(f"{where}: kind {kind!r} needs gradients at {hp_out}, which the cache lacks; "
                          f"harvest again with {hp_out!r} in harvest.gradients")
    return DecomposerSpec(name=name, kind=kind, config=config, folder=folder, lr=float(lr) if lr is not None else None)


def check_finished_matches(spec) -> None:
    """A finished folder must hold the dictionary this config asks for, not an older one of the same name."""
    from dictlearn.config import ConfigError
    from dictlearn.decomposers import base

    saved = json.loads((spec.folder / base.CONFIG_FILE).read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(spec.config)))
    if saved.get("kind") != spec.kind or saved.get("config") != wanted:
        keys = sorted(set(wanted) | set(saved.get("config", {})))
        diff = [f"{k}: saved {saved.get('config', {}).get(k)!r} vs config {wanted.get(k)!r}"
                for k in keys if saved.get("config", {}).get(k) != wanted.get(k)]
        if saved.get("kind") != spec.kind:
            diff.insert(0, f"kind: saved {saved.get('kind')!r} vs config {spec.kind!r}")
        raise ConfigError(f"{spec.folder} already holds a decomposer {spec.name!r} trained with a different config "
                          f"({'; '.join(diff)}); delete that folder or rename the decomposer")


def mlp_output_weight(cache, hookpoint: str):
    """(d_mlp, d_model) output projection of the MLP whose hidden activation `mlp_hidden.L` is, or None."""
    if not re.fullmatch(r"mlp_hidden\.\d+", hookpoint or ""):
        return None
    import torch

    from dictlearn.activations.hookpoints import resolve
    from dictlearn.activations.models import load_model

    loaded = load_model(cache.model_name)
    hp = resolve(loaded.model, [hookpoint], probe_widths=False)[0]
    module = loaded.model.get_submodule(hp.module_path)
    weight = module.weight.detach().float().cpu().numpy()
    # torch Linear stores (out, in) = (d_model, d_mlp); GPT-2's Conv1D stores (in, out) already
    return weight.T.copy() if isinstance(module, torch.nn.Linear) else weight


def train_from_config(config: Path, overrides: list[str], only: list[str]) -> int:
    from dictlearn.activations.cache import ActivationCache, CacheError
    from dictlearn.cli.common import out_dir, read_run_config
    from dictlearn.config import from_dict
    from dictlearn.trainers.logging import WandbConfig
    from dictlearn.trainers.sgd import TrainConfig, finished

    data = read_run_config(config, overrides)
    where = str(config)
    cfg = from_dict(TrainConfig, data.get("train", {}), where=f"{where} [train]")
    wandb_cfg = from_dict(WandbConfig, data.get("wandb", {}), where=f"{where} [wandb]")
    tables = decomposer_tables(data, where, only)
    root = out_dir(data, config)
    if cfg.distributed:
        from dictlearn.trainers.sharding import initialize_distributed

        initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)

    cache = ActivationCache.open(Path(cfg.cache) if cfg.cache else root / "cache")
    sgd_specs, snmf_tables = [], []
    for table in tables:
        folder = root / "decomposers" / table["name"]
        if table["kind"] == SNMF_KIND:
            if finished(folder):
                print(f"{table['name']}: already trained in {folder} (delete it to train again)")
            else:
                snmf_tables.append((table, folder))
            continue
        spec = build_spec(table, cache.hookpoints, folder, where)
        if finished(folder):
            check_finished_matches(spec)
            print(f"{spec.name}: already trained in {folder} (delete it to train again)")
        else:
            sgd_specs.append(spec)
    if not sgd_specs and not snmf_tables:
        print("dictlearn train: nothing to train")
        return 0
    try:
        cache.verify()  # a truncated or corrupt shard must not train a dictionary silently
    except CacheError as e:
        raise CacheError(f"refusing to train on the cache at {cache.path}, which does not verify: {e}") from None

    if sgd_specs:
        from dictlearn.trainers.data import CacheSource
        from dictlearn.trainers.sgd import data_keys, train

        source = CacheSource(cache, data_keys(sgd_specs), cfg.batch_size, cfg.seed)
        for name, folder in train(sgd_specs, source, cfg, root, wandb_cfg).items():
            print(f"{name}: saved to {folder}")
    for table, folder in snmf_tables:
        from dictlearn.trainers.snmf import train_snmf

        w_out = mlp_output_weight(cache, table.get("hookpoint_in", ""))
        print(f"{table['name']}: saved to {train_snmf(table, cache, folder, w_out, cfg.seed)}")
    return 0


def main(argv: list[str]) -> int:
    args = tyro.cli(TrainArgs, args=argv, prog="dictlearn train")
    from dictlearn.activations.cache import CacheError
    from dictlearn.config import ConfigError
    from dictlearn.trainers.checkpoint import CheckpointMismatch
    from dictlearn.trainers.sgd import NonFiniteLoss

    try:
        return train_from_config(args.config, args.set, args.only)
    except (ConfigError, CacheError, CheckpointMismatch, NonFiniteLoss) as e:
        print(f"dictlearn train: {e}", file=sys.stderr)
        return 1
