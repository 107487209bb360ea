"""A run: one config, one output folder, and the one place its layout and its rules are written down.

    <out_dir>/cache/               the activation cache (or wherever `train.cache` points: every stage uses it)
    <out_dir>/decomposers/<name>/  a trained dictionary (config.json, params.safetensors, train_log.jsonl, checkpoints/)
    <out_dir>/eval/                metrics.json, report.md, plots/, feature_cards/, records/<name>.json
    <out_dir>/eval_ood/<label>/    the same scores on other text: cache/ (eval-only), metrics.json, records/
    <out_dir>/export/<name>/       SAELens / semi-NMF / features files and export.json

Every stage decides "is this up to date?" the same way: a stamp file beside its outputs holds the sha256 of
each input's content, the stage's options and the sha256 of each output it wrote. The stage's work is
reused only when all three still match (so an edited config, another cache, or a damaged output file
each make the stage run again, or refuse, rather than be skipped silently).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dictlearn.config import ConfigError, from_dict, load_toml
from dictlearn.files import atomic_write_json, sha256_file

T = TypeVar("T")

CACHE_DIR, DECOMPOSERS_DIR, EVAL_DIR, EXPORT_DIR, EVAL_OOD_DIR = "cache", "decomposers", "eval", "export", "eval_ood"
STAMP_FILE = "stamp.json"

# Top-level keys of a run config and the stage that owns each.
SECTIONS = {
    "out_dir": "where every stage writes (cache/, decomposers/, eval/, export/ below it)",
    "model": "the language model (dictlearn.activations.models)",
    "corpus": "the text (dictlearn.activations.corpus)",
    "harvest": "what to cache (dictlearn.activations.harvest)",
    "train": "shared training options (dictlearn.trainers)",
    "decomposers": "list of [[decomposers]] tables, one per dictionary to train",
    "eval": "the evaluation suite (dictlearn.eval)",
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


def cache_identity(cache: Any) -> str:
    """What the cache holds, by content: its harvest identity and every shard's checksum and split.

    Two caches with the same identity hold the same rows; moving or copying a cache keeps it."""
    shards = [[s.get("file"), s.get("sha256"), s.get("rows"), s.get("split")] for s in cache.shards]
    text = json.dumps({"identity": cache.manifest.get("identity"), "shards": shards}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the one "is this stage up to date" rule -------------------------------------------------------------------
def _digest(value: Any) -> str:
    """sha256 of a file's content, or of a JSON value (e.g. a cache identity or a stage's options)."""
    if isinstance(value, Path):
        return sha256_file(value)
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def stamp_path(folder: Path, name: str = "") -> Path:
    return Path(folder) / (f"{name}.{STAMP_FILE}" if name else STAMP_FILE)


def read_stamp(folder: Path, name: str = "") -> dict[str, Any] | None:
    path = stamp_path(folder, name)
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def stale_reasons(folder: Path, inputs: dict[str, Any], options: dict[str, Any], name: str = "") -> list[str]:
    """Why the stage whose stamp is in `folder` must run again ([]: it is up to date).

    inputs: name -> a Path (its content counts) or a JSON value; options: the stage's settings (compared
    key by key, so the reasons name the keys that changed)."""
    stamp = read_stamp(folder, name)
    if stamp is None:
        return ["never finished"]
    reasons = []
    old_opts = stamp.get("options", {})
    new_opts = json.loads(json.dumps(options, default=str))
    reasons += [f"{k}: was {old_opts.get(k)!r}, now {new_opts.get(k)!r}"
                for k in sorted(set(old_opts) | set(new_opts)) if old_opts.get(k) != new_opts.get(k)]
    old_in = stamp.get("inputs", {})
    for key, value in inputs.items():
        if isinstance(value, Path) and not value.is_file():
            reasons.append(f"input {value} is missing")
        elif old_in.get(key) != _digest(value):
            reasons.append(f"input {key} changed")
    reasons += [f"input {k} is gone" for k in old_in if k not in inputs]
    for rel, digest in stamp.get("outputs", {}).items():
        path = Path(folder) / rel
        if not path.is_file():
            reasons.append(f"output {path} is missing")
        elif sha256_file(path) != digest:
            reasons.append(f"output {path} was changed or damaged after it was written")
    return reasons


def up_to_date(folder: Path, inputs: dict[str, Any], options: dict[str, Any], name: str = "") -> bool:
    return not stale_reasons(folder, inputs, options, name)


def mark_done(folder: Path, inputs: dict[str, Any], options: dict[str, Any], outputs: list[str], name: str = "") -> Path:
    """Record that the stage finished: its inputs' digests, its options and its outputs' digests (files
    named relative to `folder`)."""
    folder = Path(folder)
    stamp = {"inputs": {k: _digest(v) for k, v in inputs.items()},
             "options": json.loads(json.dumps(options, default=str)),
             "outputs": {rel: sha256_file(folder / rel) for rel in outputs}}
    return atomic_write_json(stamp_path(folder, name), stamp)


# --- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A run config and the folders, cache and model it names (see the module docstring for the layout)."""

    config_path: Path
    data: dict[str, Any]
    out_dir: Path
    _cache: Any = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)
    _online: Any = field(default=None, repr=False)

    @classmethod
    def from_config(cls, path: str | Path, overrides: list[str] | None = None) -> "Run":
        data = read_run_config(path, overrides)
        out = Path(data.get("out_dir") or Path("runs") / Path(path).stem)
        run = cls(Path(path), data, out)
        if (run.data.get("eval") or {}).get("cache"):
            raise ConfigError(f"{path}: eval.cache is gone: every stage uses one cache, `train.cache` "
                              f"(default <out_dir>/{CACHE_DIR}); set that instead, or score the saved dictionaries "
                              f"on other text with `dictlearn eval CONFIG --corpus PATH` (or [[eval.ood]] entries), "
                              f"which writes <out_dir>/{EVAL_OOD_DIR}/<label>/ and leaves eval/ alone")
        return run

    def section(self, cls: type[T], name: str) -> T:
        """The `[name]` table parsed strictly into dataclass `cls`."""
        table = self.data.get(name) or {}
        if not isinstance(table, dict):
            raise ConfigError(f"{self.config_path}: [{name}] must be a table")
        return from_dict(cls, table, where=f"{self.config_path} [{name}]")

    # layout
    @property
    def cache_dir(self) -> Path:
        """`train.cache` when given, else <out_dir>/cache: the one cache every stage reads."""
        given = (self.data.get("train") or {}).get("cache")
        if given and "://" in str(given):  # a URL, read through fsspec: Path() would fold its "//"
            return given
        return Path(given) if given else self.out_dir / CACHE_DIR

    @property
    def decomposers_dir(self) -> Path:
        return self.out_dir / DECOMPOSERS_DIR

    def decomposer_dir(self, name: str) -> Path:
        return self.decomposers_dir / name

    @property
    def eval_dir(self) -> Path:
        return self.out_dir / EVAL_DIR

    def ood_dir(self, label: str) -> Path:
        """Where the scores on another text go: its eval-only cache/, metrics.json and records/."""
        return self.out_dir / EVAL_OOD_DIR / label

    def export_dir(self, name: str) -> Path:
        return self.out_dir / EXPORT_DIR / name

    def saved_decomposers(self) -> list[str]:
        """Names of the folders under decomposers/ that hold a saved dictionary."""
        from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE

        root = self.decomposers_dir
        return sorted(p.name for p in root.iterdir()
                      if (p / CONFIG_FILE).is_file() and (p / PARAMS_FILE).is_file()) if root.is_dir() else []

    def pick_saved(self, names: list[str], stage: str) -> list[str]:
        """`names` (every saved decomposer when empty), each checked to be saved."""
        saved = self.saved_decomposers()
        if not saved:
            raise ConfigError(f"no trained decomposers under {self.decomposers_dir}; run "
                              f"`dictlearn train {self.config_path}` first")
        missing = [n for n in names if n not in saved]
        if missing:
            raise ConfigError(f"{stage}: no saved decomposer named {', '.join(missing)} under {self.decomposers_dir}; "
                              f"saved: {', '.join(saved)}")
        return list(names) or saved

    # cache and model
    def open_cache(self):
        """The run's activation cache (opened once); the parts of an unmerged multi-process harvest are refused
        with a sentence saying which parts are unfinished and to run `dictlearn cache merge`."""
        if self._cache is None:
            from dictlearn.activations.cache import ActivationCache, CacheError
            from dictlearn.activations.merge import unmerged_note

            if (note := unmerged_note(self.cache_dir)) is not None:
                raise CacheError(note)
            self._cache = ActivationCache.open(self.cache_dir)
        return self._cache

    # online training (train.source = "model")
    @property
    def online(self) -> bool:
        """True when `train.source = "model"`: the model computes the train split as training runs (no train
        cache); the cache folder holds only the held-out shards (dictlearn.activations.online)."""
        source = (self.data.get("train") or {}).get("source", "cache")
        from dictlearn.trainers.sgd import SOURCES

        if source not in SOURCES:
            raise ConfigError(f"{self.config_path}: train.source must be one of {', '.join(SOURCES)}, got {source!r}")
        return source == "model"

    def online_plan(self):
        """The harvest plan of [model], [corpus] and [harvest], with the corpus tokenised (built once per run
        object; the model it loads is the run's model)."""
        if self._online is None:
            from dictlearn.activations.corpus import CorpusConfig
            from dictlearn.activations.harvest import HarvestConfig
            from dictlearn.activations.online import OnlinePlan

            missing = [t for t in ("model", "corpus", "harvest") if not isinstance(self.data.get(t), dict)]
            if missing:
                raise ConfigError(f"{self.config_path}: train.source = \"model\" runs the model as training runs and needs "
                                  f"the [model], [corpus] and [harvest] tables; missing: {', '.join(missing)}")
            self._model = self._model or self.load_model()
            self._online = OnlinePlan(self._model, self.section(CorpusConfig, "corpus"), self.section(HarvestConfig, "harvest"))
        return self._online

    def model_config(self):
        """The [model] table as a ModelConfig, or None when the config has none."""
        if not self.data.get("model"):
            return None
        from dictlearn.activations.models import ModelConfig

        return self.section(ModelConfig, "model")

    def model_reference(self) -> tuple[str | None, str | None]:
        """(the user's name for the model, its weights' fingerprint): [model].name as written (a hub id or
        the path as given, never resolved to this machine's absolute path), else the cache's; the
        fingerprint is the one the cache was harvested from."""
        table = self.data.get("model") or {}
        name, fingerprint = table.get("name"), None
        try:
            info = self.open_cache().manifest.get("model", {})
            name, fingerprint = name or info.get("name"), info.get("fingerprint")
        except (OSError, ValueError, RuntimeError, KeyError):  # no cache: the name alone
            pass
        return name, fingerprint

    def load_model(self, torch_threads: int = 0):
        """The language model ([model] table, else the cache's model on the CPU), refused unless its weights
        are the ones the cache was harvested from."""
        from dictlearn.activations.models import load_model

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        config = self.model_config()
        if self.online and config is not None and not (self.cache_dir / "manifest.json").is_file():
            return config.load()  # online and nothing harvested yet: [model] is the model
        info = self.open_cache().manifest["model"]
        loaded = config.load() if config is not None else load_model(info["name"], dtype=info.get("dtype", "float32"))
        if info.get("fingerprint") and loaded.fingerprint != info["fingerprint"]:
            raise ConfigError(f"the model {loaded.name!r} has weights {loaded.fingerprint}, but the cache at "
                              f"{self.cache_dir} was harvested from {info['fingerprint']}; point [model] at the "
                              f"model the cache came from, or harvest again")
        return loaded

    def model(self, torch_threads: int = 0):
        """`load_model`, loaded once per run object."""
        if self._model is None:
            self._model = self.load_model(torch_threads)
        return self._model

    def output_projection(self, hookpoint: str):
        """(W_out (d_hidden, d_model), where hidden @ W_out appears) when `hookpoint` is an MLP hidden site of
        the run's model, else None (the family table decides; the model is loaded only when asked)."""
        from dictlearn.activations import families

        model = self.model().model
        return families.output_projection(model, hookpoint) if families.is_hidden_site(model, hookpoint) else None

    def stage_options(self, obj: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """A stage's options (a dataclass) as plain JSON, less the keys that do not change its outputs."""
        return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(obj), default=str)).items() if k not in drop}
