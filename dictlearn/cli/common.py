"""Config handling shared by the subcommands: one TOML file, one table per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dictlearn.config import ConfigError, load_toml

# Top-level keys of a run config and the stage that owns each.
SECTIONS = {
    "out_dir": "where every stage writes (cache/, decomposers/, eval/, export/ below it)",
    "model": "the language model (dictlearn.activations.models)",
    "corpus": "the text (dictlearn.activations.corpus)",
    "harvest": "what to cache (dictlearn.activations.harvest)",
    "train": "shared training options (trainers/)",
    "decomposers": "list of [[decomposers]] tables, one per dictionary to train",
    "eval": "the evaluation suite (eval/)",
    "export": "export options (dictlearn.export)",
    "wandb": "logging: mode = offline | online | disabled, project, entity",
}


def read_run_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Raw TOML of a run config with `key.path=value` overrides applied; unknown top-level keys refused."""
    data = load_toml(path, overrides)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))}; valid keys are: {', '.join(SECTIONS)}")
    return data


def out_dir(data: dict[str, Any], config_path: str | Path) -> Path:
    """The run's output folder (default: runs/<config file stem>)."""
    return Path(data.get("out_dir") or Path("runs") / Path(config_path).stem)
