"""Trainers: fit decomposers to activations. One protocol for every trainer:

    train(specs, source, cfg, wandb_cfg=None, *, log_dir=None, mesh=None, output_projection=None) -> TrainResult

`sgd` fits every autoencoder-style kind in one shared pass; `snmf` solves semi-NMF. `train` below groups
the specs by their kind's `trainer` attribute and hands each group to its trainer.
"""

from __future__ import annotations

from typing import Any

from dictlearn.trainers.spec import DecomposerSpec, TrainResult, data_keys, trainer_module, trainer_name


def train(specs: list[DecomposerSpec], source: Any, cfg: Any, wandb_cfg: Any = None, **kwargs: Any) -> TrainResult:
    """Train every spec with its kind's trainer on `source` (a BatchSource holding every key they read, in
    batches of cfg.batch_size); each trainer gets the source's view of the keys its specs read."""
    groups: dict[str, list[DecomposerSpec]] = {}
    for spec in specs:
        groups.setdefault(trainer_name(spec.kind), []).append(spec)
    result = TrainResult({}, {}, {})
    for name, group in groups.items():
        keys = data_keys(group)
        view = source if list(source.keys) == keys else source.view(keys, source.batch_size)
        result = result.merge(trainer_module(name).train(group, view, cfg, wandb_cfg, **kwargs))
    return result
