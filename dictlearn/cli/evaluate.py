"""`dictlearn eval CONFIG.toml [--set key=value]... [--only NAME]... [--force]`

Scores every decomposer saved under `<out_dir>/decomposers/` on the held-out split of the run's cache
(reconstruction, sparsity, spliced-in downstream loss, feature cards, and steering when `[eval.steering]`
is given) and writes `<out_dir>/eval/`: metrics.json, report.md, plots/, feature_cards/. Options come from
the config's `[eval]` table (see eval.suite.EvalConfig). A decomposer whose files and eval options are
unchanged since its last evaluation is not evaluated again unless --force is given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

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


def evaluate(args: EvalArgs) -> int:
    from dictlearn.activations.models import ModelConfig
    from dictlearn.cli.common import out_dir, read_run_config
    from dictlearn.config import from_dict
    from dictlearn.eval.suite import EvalConfig, evaluate_run

    data = read_run_config(args.config, args.set)
    cfg = from_dict(EvalConfig, data.get("eval", {}), where=f"{args.config} [eval]")
    model = from_dict(ModelConfig, data["model"], where=f"{args.config} [model]") if "model" in data else None
    if args.only:
        cfg.decomposers = list(args.only)
    corpus = str(data.get("corpus", {}).get("path", ""))
    if cfg.steering is not None and not cfg.steering.get("corpus") and corpus.endswith((".jsonl", ".jsonl.gz")):
        cfg.steering = {**cfg.steering, "corpus": corpus}  # the run's labelled corpus judges the steered text
    cache = cfg.cache or data.get("train", {}).get("cache") or ""
    evaluate_run(out_dir(data, args.config), cfg, force=args.force, cache_path=Path(cache) if cache else None,
                 model_config=model)
    return 0


def main(argv: list[str]) -> int:
    args = tyro.cli(EvalArgs, args=argv, prog="dictlearn eval")
    from dictlearn.activations.cache import CacheError
    from dictlearn.config import ConfigError
    from dictlearn.eval.downstream import DownstreamError
    from dictlearn.eval.suite import EvalError

    try:
        return evaluate(args)
    except (ConfigError, CacheError, EvalError, DownstreamError, FileNotFoundError) as e:
        print(f"dictlearn eval: {e}", file=sys.stderr)
        return 1
