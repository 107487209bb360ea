"""The one protocol every decomposer follows, and its native on-disk format.

Decomposers are pure JAX math: arrays in, arrays out. They never see a model, a cache, a loop or a
score, so the trainers and the evaluation suite can treat an SAE, a transcoder and semi-NMF alike.

Batches are dicts of float32 arrays:
  "x"    (B, d_in)   what the decomposer reads (the activation at `hookpoint_in`)
  "y"    (B, d_out)  what it must reconstruct (the activation at `hookpoint_out`; equal to x for SAEs)
  "grad" (B, d_out)  optional: d(next-token loss)/d(activation) at the hookpoint (gradient TopK only)
A kind with `site_axis` (a cross-layer transcoder) reads several sites: each array gains a site axis,
(B, L, d), in the order of config.hookpoints_in() / hookpoints_out().
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"


@dataclasses.dataclass
class DecomposerConfig:
    """Fields shared by every decomposer; subclasses add their own hyper-parameters."""

    d_in: int  # width of hookpoint_in (filled in from the cache by `dictlearn train`)
    n_features: int  # dictionary size (or give `expansion` in a [[decomposers]] table)
    d_out: int | None = None  # None: same as d_in (an SAE)
    hookpoint_in: str = ""  # where the dictionary reads (e.g. resid_post.10, mlp_in.10)
    hookpoint_out: str = ""  # "" : same as hookpoint_in
    seed: int = 0  # initialisation seed

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        if not self.hookpoint_out:
            self.hookpoint_out = self.hookpoint_in
        if self.d_in <= 0 or self.n_features <= 0 or self.d_out <= 0:
            raise ValueError(f"d_in, d_out and n_features must be positive, got {self.d_in}, {self.d_out}, {self.n_features}")

    @property
    def needs_grad(self) -> bool:
        """Batches must carry "grad" (the loss gradient at hookpoint_out). Derived from the config, so a kind
        whose mechanism is chosen by a field (a transcoder's `sparsity`) answers per instance."""
        return False

    def hookpoints_in(self) -> list[str]:
        """The sites read, in order: [hookpoint_in]; a site-axis kind (a cross-layer transcoder) reads one per
        layer of its range (`mlp_in.0-3`)."""
        return [self.hookpoint_in]

    def hookpoints_out(self) -> list[str]:
        """The sites written, in order: [hookpoint_out]; one per layer for a site-axis kind."""
        return [self.hookpoint_out]

    def sparsity_target(self) -> float | None:
        """The L0 (active latents per token, every site together) this config aims at, so a comparison can mark
        a dictionary that missed it; None: the kind sets no target (semi-NMF's codes are not sparse by a rule)."""
        return None


class Decomposer(nnx.Module):
    """Base class: subclasses set `kind` and `config_cls` and implement the four methods below.

    What the rest of dictlearn needs to know about a kind is asked of the kind itself, never of its name:
    `trainer` (which trainer fits it), `export_format` (which writer exports it), `example` (a tiny
    `[[decomposers]]` table the test suite runs every registered kind with) and `config.needs_grad`."""

    kind: ClassVar[str] = ""
    config_cls: ClassVar[type[DecomposerConfig]] = DecomposerConfig
    trainer: ClassVar[str] = "sgd"  # "sgd" (trainers.sgd, gradient steps on `loss`) | "snmf" (the semi-NMF solver)
    export_format: ClassVar[str] = ""  # "linear" (SAELens/sparsify via export.kinds.to_linear) | "snmf" | "": none
    # A small [[decomposers]] table: hookpoints as alias stems without a layer ("resid_post", "mlp_in"), which
    # tests complete with a layer; `expansion` or `n_features`; the kind's own keys at tiny-test values.
    example: ClassVar[dict[str, Any]] = {}
    # True: batches carry a site axis, "x" (B, L, d_in) and "y" (B, L, d_out) stacked in the order of
    # config.hookpoints_in() / hookpoints_out(), input scales are arrays (L,), codes are (B, L, n_features).
    site_axis: ClassVar[bool] = False
    config: DecomposerConfig

    @property
    def needs_grad(self) -> bool:
        """Whether training batches must carry "grad": the config's answer (see DecomposerConfig.needs_grad)."""
        return self.config.needs_grad

    def encode(self, x: jax.Array) -> jax.Array:
        """(B, d_in) -> (B, n_features) non-negative codes (dense layout, mostly zeros)."""
        raise NotImplementedError

    def decode(self, codes: jax.Array) -> jax.Array:
        """(B, n_features) -> (B, d_out) reconstruction."""
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))

    def loss(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training objective on one batch: (scalar, metrics). Metrics hold at least
        'mse' (mean over rows of the squared error summed over dims), 'fvu' and 'l0', and
        'fired' (n_features,) bool: which latents fired in this batch (for dead-latent tracking)."""
        raise NotImplementedError

    def features(self) -> jax.Array:
        """(n_features, d_out) feature directions in the space the decomposer writes to."""
        raise NotImplementedError

    def loss_and_grads(self, batch: dict[str, jax.Array]) -> tuple[tuple[jax.Array, dict[str, jax.Array]], nnx.State]:
        """((loss, metrics), gradients of the nnx.Params): what a training step differentiates."""
        return nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(self)

    # Training hooks with no-op defaults; the SGD trainer calls them in this order each step.
    def init_from_data(self, x: jax.Array, y: jax.Array) -> None:
        """Data-dependent initialisation (e.g. decoder bias at the geometric median of a sample)."""

    def project_grads(self, grads: nnx.State) -> nnx.State:
        """Adjust gradients before the optimiser step (e.g. remove the part parallel to decoder rows)."""
        return grads

    def after_step(self, metrics: dict[str, jax.Array]) -> None:
        """After the optimiser step (e.g. renormalise decoder rows, update dead-latent counters)."""

    def fold_input_scale(self, scale_in: float, scale_out: float) -> None:
        """Make a decomposer trained on (scale_in * x -> scale_out * y) work on raw x and y, in place.

        Trainers scale inputs to unit mean squared norm; this folds that scale back into the weights
        so that a saved dictionary reads and writes raw activations."""
        raise NotImplementedError


REGISTRY: dict[str, type[Decomposer]] = {}


def register(cls: type[Decomposer]) -> type[Decomposer]:
    """Class decorator: make a decomposer loadable by its `kind`."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} must set a non-empty `kind`")
    REGISTRY[cls.kind] = cls
    return cls


def config_to_json(kind: str, config: DecomposerConfig) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "kind": kind, "config": dataclasses.asdict(config)}


def config_from_json(data: dict[str, Any]) -> tuple[type[Decomposer], DecomposerConfig]:
    from dictlearn.config import from_dict

    kind = data.get("kind")
    if kind not in REGISTRY:
        raise ValueError(f"unknown decomposer kind {kind!r}; known kinds: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[kind]
    return cls, from_dict(cls.config_cls, data["config"], where=f"{kind} config")


def build(kind: str, config: DecomposerConfig | dict[str, Any]) -> Decomposer:
    """Instantiate a decomposer of `kind` (randomly initialised from config.seed)."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown decomposer kind {kind!r}; known kinds: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[kind]
    if isinstance(config, dict):
        from dictlearn.config import from_dict

        config = from_dict(cls.config_cls, config, where=f"{kind} config")
    return cls(config, rngs=nnx.Rngs(config.seed))


def state_arrays(module: Decomposer) -> dict[str, np.ndarray]:
    """Every nnx variable of the module (params and buffers) as flat float32/int numpy arrays."""
    flat = nnx.to_flat_state(nnx.state(module))
    return {".".join(str(k) for k in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value) for path, v in flat}


def save(module: Decomposer, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the native format: params.safetensors, then config.json (each atomically, so a folder with
    config.json holds a complete dictionary)."""
    from dictlearn.files import atomic_save_safetensors, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = config_to_json(module.kind, module.config)
    if extra:
        meta["extra"] = extra
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state_arrays(module).items()}  # keep 0-d
    atomic_save_safetensors(folder / PARAMS_FILE, arrays)
    atomic_write_json(folder / CONFIG_FILE, meta, indent=2)
    return folder


class LoadError(ValueError):
    """A decomposer folder whose files cannot be read as a saved dictionary."""


# Variables renamed since format 1 was first written: old name -> new name (read old folders as they are).
RENAMED = {"sparsity.tokens_since_fired": "tokens_since_fired"}
# Counters added since: a folder saved before them starts them at zero.
ADDED_COUNTERS = ("tokens_since_fired",)


def _unreadable(path: Path, problem: str) -> LoadError:
    return LoadError(f"{path}: {problem}. The folder {path.parent} does not hold a complete dictionary: delete "
                     f"that folder and train again (or export/import it again if it came from another tool)")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise _unreadable(path, "not a dictlearn decomposer config (it needs \"kind\" and a \"config\" table)")
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise LoadError(f"{path}: format_version {version!r}; this dictlearn reads version {FORMAT_VERSION}")
    return data


def _read_params(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError

    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, f"not a readable safetensors file ({e})") from None
    return {RENAMED.get(k, k): v for k, v in arrays.items()}


def load(folder: str | Path) -> Decomposer:
    """Load a decomposer saved by `save`, validating names and shapes against its config."""
    folder = Path(folder)
    cfg_path, params_path = folder / CONFIG_FILE, folder / PARAMS_FILE
    if not cfg_path.is_file() or not params_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a dictlearn decomposer folder: it needs {CONFIG_FILE} and {PARAMS_FILE}"
        )
    try:
        cls, config = config_from_json(_read_config(cfg_path))
    except LoadError:
        raise
    except ValueError as e:  # an unknown kind, a key this version does not know, a bad value
        raise LoadError(f"{cfg_path}: {e}") from None
    module = cls(config, rngs=nnx.Rngs(config.seed))
    arrays = _read_params(params_path)
    expected = state_arrays(module)
    for name in ADDED_COUNTERS:
        if name in expected and name not in arrays:
            arrays[name] = np.zeros_like(expected[name])
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise LoadError(f"{params_path}: parameter names do not match a {cls.kind} decomposer "
                        f"(missing {missing}, unexpected {unexpected})")
    for k, v in expected.items():
        if arrays[k].shape != v.shape:
            raise LoadError(f"{params_path}: {k} has shape {arrays[k].shape}, the config implies {v.shape}")
    flat = nnx.to_flat_state(nnx.state(module))
    for path, var in flat:
        key = ".".join(str(p) for p in path)
        var.set_value(jnp.asarray(arrays[key], dtype=var.get_value().dtype))
    return module
