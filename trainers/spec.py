"""What the train stage is asked to fit: one `DecomposerSpec` per `[[decomposers]]` table, and what it returns.

A table splits three ways: `name`, `kind` and `expansion` are the stage's; the keys of the kind's trainer
options (`lr` for SGD, the solver settings for semi-NMF; `OPTIONS` in each trainer module) go to that
trainer; everything else is the kind's own config. d_in and d_out come from the cache's hookpoint widths.
Which trainer fits a kind is the kind's `trainer` class attribute, never its name.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path
from typing import Any

from dictlearn.config import ConfigError, from_dict
from dictlearn.decomposers import base
from dictlearn.hookpoint_names import expand_hookpoints

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
STAGE_KEYS = ("name", "kind", "expansion")
TRAINERS = {"sgd": "dictlearn.trainers.sgd", "snmf": "dictlearn.trainers.snmf"}  # trainer name -> its module


def kinds() -> dict[str, type[base.Decomposer]]:
    """Every registered kind (importing the package registers them all)."""
    import dictlearn.decomposers  # noqa: F401

    return base.REGISTRY


def trainer_name(kind: str) -> str:
    return kinds()[kind].trainer


def trainer_module(name: str):
    """The module of trainer `name`: it defines `OPTIONS` (a dataclass) and `train(specs, source, cfg, ...)`."""
    if name not in TRAINERS:
        raise ConfigError(f"unknown trainer {name!r}; trainers are {', '.join(TRAINERS)}")
    return importlib.import_module(TRAINERS[name])


@dataclasses.dataclass
class DecomposerSpec:
    """One dictionary to train: its kind and config, its trainer's options, and the folder it is written to."""

    name: str
    kind: str
    config: base.DecomposerConfig
    folder: Path
    lr: float | None = None  # SGD: None means TrainConfig.lr
    options: Any = None  # the trainer's OPTIONS for this table (None: its defaults)

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise ValueError(f"decomposer name {self.name!r} must be a plain folder name (letters, digits, . _ -)")
        self.folder = Path(self.folder)

    @property
    def x_key(self) -> str:
        return self.config.hookpoint_in

    @property
    def y_key(self) -> str:
        return self.config.hookpoint_out

    @property
    def grad_key(self) -> str:
        return f"{self.config.hookpoint_out}@grad"

    @property
    def needs_grad(self) -> bool:
        """Whether batches must carry the gradient at hookpoint_out (the kind's config says)."""
        return bool(self.config.needs_grad)

    @property
    def site_axis(self) -> bool:
        """Batches stack several sites (x_keys, y_keys) on a site axis (a cross-layer transcoder)."""
        return kinds()[self.kind].site_axis

    @property
    def x_keys(self) -> list[str]:
        return self.config.hookpoints_in()

    @property
    def y_keys(self) -> list[str]:
        return self.config.hookpoints_out()

    @property
    def grad_keys(self) -> list[str]:
        return [f"{k}@grad" for k in self.y_keys]

    def keys(self) -> list[str]:
        """Every activation key the decomposer's batches need: all its sites (and their gradients when needed)."""
        return list(dict.fromkeys(self.x_keys + self.y_keys + (self.grad_keys if self.needs_grad else [])))

    def signature(self) -> dict[str, Any]:
        """What decides the trained parameters besides the shared [train] options and the data."""
        opts = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else dict(self.options or {})
        opts.pop("lr", None)  # recorded once, as the spec's lr
        sig = {"kind": self.kind, "config": dataclasses.asdict(self.config), "lr": self.lr}
        if opts:
            sig["options"] = opts
        return json.loads(json.dumps(sig, default=str))


@dataclasses.dataclass
class TrainResult:
    """What a trainer returns: the trained dictionaries (reading raw activations) and their logs."""

    decomposers: dict[str, base.Decomposer]
    logs: dict[str, list[dict[str, Any]]]
    folders: dict[str, Path]

    def merge(self, other: "TrainResult") -> "TrainResult":
        return TrainResult({**self.decomposers, **other.decomposers}, {**self.logs, **other.logs},
                           {**self.folders, **other.folders})


def data_keys(specs: list[DecomposerSpec]) -> list[str]:
    """Every activation key a pass needs, in first-use order."""
    return list(dict.fromkeys(k for s in specs for k in s.keys()))


def check_tables(tables: Any, where: str, only: list[str]) -> list[dict[str, Any]]:
    """The `[[decomposers]]` tables to train, each with a unique, valid name and a kind."""
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


def build_spec(table: dict[str, Any], hookpoints: dict[str, dict], folder: Path, where: str) -> DecomposerSpec:
    """A DecomposerSpec from one table, with d_in/d_out from the cache and n_features from `expansion`."""
    registry = kinds()
    name, kind = table["name"], table["kind"]
    where = f"{where} [[decomposers]] {name!r}"
    if kind not in registry:
        raise ConfigError(f"{where}: unknown kind {kind!r}; kinds are {', '.join(sorted(registry))}")
    cls = registry[kind]
    trainer = trainer_module(trainer_name(kind))
    option_keys = {f.name for f in dataclasses.fields(trainer.OPTIONS)}
    rest = {k: v for k, v in table.items() if k not in STAGE_KEYS and k not in option_keys}
    activations = sorted(k for k in hookpoints if not k.endswith("@grad"))
    hp_in = rest.get("hookpoint_in")
    if not hp_in:
        raise ConfigError(f"{where}: needs `hookpoint_in`; the cache holds {', '.join(activations)}")
    hp_out = rest.get("hookpoint_out") or hp_in
    widths = {"d_in": _site_width(hp_in, hookpoints, cls, where), "d_out": _site_width(hp_out, hookpoints, cls, where)}
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
        rest["n_features"] = max(1, int(round(expansion * widths["d_in"])))
    try:
        config = from_dict(cls.config_cls, rest, where=where)
    except ConfigError as e:
        raise ConfigError(f"{e} (plus the stage's keys {', '.join(STAGE_KEYS)} and the "
                          f"{trainer_name(kind)} trainer's {', '.join(sorted(option_keys))})") from None
    options = from_dict(trainer.OPTIONS, {k: v for k, v in table.items() if k in option_keys}, where=where)
    lacking = [h for h in config.hookpoints_out() if f"{h}@grad" not in hookpoints]
    if config.needs_grad and lacking:
        raise ConfigError(f"{where}: kind {kind!r} with this config needs gradients at {', '.join(lacking)}, which the "
                          f"cache lacks; harvest again with {hp_out!r} in harvest.gradients")
    lr = getattr(options, "lr", None)
    return DecomposerSpec(name=name, kind=kind, config=config, folder=folder, lr=lr, options=options)


def _site_width(name: str, hookpoints: dict[str, dict], cls: type[base.Decomposer], where: str) -> int:
    """The width of the site(s) `name` names in the cache: one hookpoint, or for a site-axis kind a layer range
    (`mlp_in.0-3`) whose every layer the cache holds, all of one width."""
    try:
        sites = expand_hookpoints(name)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if len(sites) > 1 and not cls.site_axis:
        multi = sorted(k for k, c in kinds().items() if c.site_axis)
        raise ConfigError(f"{where}: kind {cls.kind!r} reads and writes one hookpoint, but {name!r} names "
                          f"{len(sites)}; give one layer (e.g. {sites[0]!r}), or use a kind with a site axis "
                          f"({', '.join(multi) or 'none is installed'})")
    activations = sorted(k for k in hookpoints if not k.endswith("@grad"))
    missing = [s for s in sites if s not in hookpoints]
    if missing:
        raise ConfigError(f"{where}: the cache has no hookpoint {', '.join(map(repr, missing))}; it holds "
                          f"{', '.join(activations)}" + (f" (harvest every layer of {name!r}: the same range "
                                                         f"works in harvest.hookpoints)" if len(sites) > 1 else ""))
    widths = {s: hookpoints[s]["width"] for s in sites}
    if len(set(widths.values())) > 1:
        raise ConfigError(f"{where}: the layers of {name!r} must have one width, the cache has "
                          f"{', '.join(f'{s} {w}' for s, w in widths.items())}")
    return widths[sites[0]]
