"""`dictlearn harvest CONFIG.toml [--set key=value]...`

Runs the `[model]` over the `[corpus]` and stores the `[harvest]` hookpoints in the run's cache folder
(`train.cache` when given, else `<out_dir>/cache`: the one rule every stage uses, `dictlearn.run.Run.cache_dir`).
Prints the estimated size first and refuses when the disk lacks room; a progress bar shows tokens/s and
the time left. Killed at any moment, the same command continues after the last complete shard; a cache
made with a different config is refused.

Several processes (`--process-index I --process-count N`, or the launcher's SLURM_PROCID/SLURM_NTASKS,
RANK/WORLD_SIZE or DICTLEARN_PROCESS_INDEX/COUNT) each harvest their share of the shards into
`<cache>/parts/I-of-N/`; the first process to see every part complete merges them into the cache. By default
each process then waits until the cache is merged (so `dictlearn run` trains on it next); with `--no-wait`
it exits when its part is done.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro


@dataclass
class HarvestArgs:
    config: Annotated[Path, tyro.conf.Positional]
    """the run config (TOML)"""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """config override key.path=value, e.g. --set harvest.n_tokens=200000"""
    process_index: int | None = None
    """this process's number, 0..N-1 (default: DICTLEARN_PROCESS_INDEX, SLURM_PROCID or RANK, else 0)"""
    process_count: int | None = None
    """how many processes share the harvest (default: DICTLEARN_PROCESS_COUNT, SLURM_NTASKS or WORLD_SIZE, else 1)"""
    wait: bool = True
    """with several processes: wait until every part is done and merged (--no-wait: exit after this part)"""


def configs_from(data: dict, where: str):
    """(ModelConfig, CorpusConfig, HarvestConfig) from a run config's tables (strict: unknown keys fail)."""
    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig
    from dictlearn.activations.models import ModelConfig
    from dictlearn.config import ConfigError, from_dict

    out = []
    for section, cls in (("model", ModelConfig), ("corpus", CorpusConfig), ("harvest", HarvestConfig)):
        if not isinstance(data.get(section), dict):
            raise ConfigError(f"{where}: needs a [{section}] table")
        out.append(from_dict(cls, data[section], where=f"{where}[{section}]"))
    return tuple(out)


def run(args: HarvestArgs) -> Path:
    from dictlearn.activations.corpus import check_corpus, is_local
    from dictlearn.activations.harvest import harvest
    from dictlearn.activations.merge import merge_when_complete, unmerged_note
    from dictlearn.activations.processes import slot_and_source
    from dictlearn.run import Run

    index, count, source = slot_and_source(args.process_index, args.process_count)  # a bad slot fails first
    run_ = Run.from_config(args.config, args.set)
    model_cfg, corpus_cfg, harvest_cfg = configs_from(run_.data, str(args.config))
    if is_local(corpus_cfg.path):
        check_corpus(corpus_cfg)  # a bad corpus path, field or an empty corpus fails before the model loads
    out = run_.cache_dir
    if count > 1:
        print(f"harvest: process {index} of {count} (from {source})", file=sys.stderr)
    cache = harvest(model_cfg.load(), corpus_cfg, harvest_cfg, out, process=(index, count))
    if count > 1:
        cache = merge_when_complete(out, wait=args.wait)
        if cache is None:
            print(f"harvest: part {index}-of-{count} is complete. {unmerged_note(out)} (the last process to "
                  "finish merges them by itself)")
            return out
    print(cache.summary())
    return out


def main(argv: list[str]) -> int:
    args = tyro.cli(HarvestArgs, args=argv, prog="dictlearn harvest", description=__doc__)
    from dictlearn.activations.cache import CacheError
    from dictlearn.activations.corpus import CorpusError
    from dictlearn.activations.harvest import HarvestError
    from dictlearn.activations.hookpoints import HookpointError
    from dictlearn.config import ConfigError  # also a bad process index or count (processes.ProcessSlotError)
    from dictlearn.files import LockedError

    try:
        run(args)
    except (ConfigError, CacheError, CorpusError, HarvestError, HookpointError, LockedError, FileNotFoundError) as e:
        print(f"dictlearn harvest: {e}", file=sys.stderr)
        return 1
    return 0
