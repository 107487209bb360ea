"""`features.safetensors` + `features.json`: one steering vector per feature, ready to add to a model.

Format (version 1), in one folder:
- `features.safetensors`: a single tensor `vectors`, float32, shape (n_features, width). Row i is feature i's
  direction in the space it is added to: adding alpha * vectors[i] at `hookpoint` is what a feature
  activation of alpha writes there (SAE decoder rows; a transcoder's rows at its output hookpoint;
  semi-NMF's residual-stream directions at mlp_out).
- `features.json`: {"format": "dictlearn-features", "format_version": 1, "hookpoint": str, "model": str | null
  (the user's name for the model: a hub id or the path as given, what `dictlearn steer` loads by default),
  "model_fingerprint": str | null (its weights, to check a model found elsewhere), "n_features": int,
  "width": int, "dtype": "float32", "sha256": hex digest of the tensor's raw bytes (row-major,
  little-endian), "source": {...what made it...}}.

`read_features` checks names, shapes, dtype and the checksum, so a truncated, edited or mismatched
file is refused rather than silently steering with the wrong vectors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from dictlearn.files import atomic_save_safetensors, atomic_write_json

FORMAT = "dictlearn-features"
FORMAT_VERSION = 1
VECTORS_FILE = "features.safetensors"
META_FILE = "features.json"
TENSOR = "vectors"


class FeaturesError(ValueError):
    """A features folder that cannot be used as written."""


@dataclass
class FeatureSet:
    vectors: np.ndarray  # (n_features, width) float32
    hookpoint: str
    model: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str | None = None

    @property
    def n_features(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    def vector(self, index: int, where: str = "the feature set") -> np.ndarray:
        """Row `index`, with an error naming the index and the valid range when it is out of range."""
        if not 0 <= index < self.n_features:
            raise FeaturesError(f"feature {index} is out of range: {where} holds {self.n_features} features "
                                f"(indices 0..{self.n_features - 1})")
        return self.vectors[index]


def checksum(vectors: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).hexdigest()


def write_features(folder: str | Path, vectors: Any, hookpoint: str, model: str | None = None,
                   source: dict[str, Any] | None = None, model_fingerprint: str | None = None) -> Path:
    """Write features.safetensors + features.json into `folder` (created); returns the folder."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise FeaturesError(f"feature vectors must be a non-empty (n_features, width) matrix, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise FeaturesError("feature vectors hold non-finite values (inf or nan)")
    if not hookpoint:
        raise FeaturesError("a features file must name the hookpoint its vectors are added at")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    v = np.ascontiguousarray(v)
    atomic_save_safetensors(folder / VECTORS_FILE, {TENSOR: v})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "hookpoint": hookpoint, "model": model,
            "model_fingerprint": model_fingerprint, "n_features": int(v.shape[0]), "width": int(v.shape[1]),
            "dtype": "float32", "sha256": checksum(v), "source": source or {}}
    atomic_write_json(folder / META_FILE, meta, indent=2)
    return folder


def features_folder(path: str | Path) -> Path:
    """A folder holding the pair, or the path of either file in it."""
    path = Path(path)
    return path.parent if path.name in (VECTORS_FILE, META_FILE) else path


def read_features(path: str | Path) -> FeatureSet:
    """Read and validate a features folder (or either of its two files)."""
    folder = features_folder(path)
    vec_path, meta_path = folder / VECTORS_FILE, folder / META_FILE
    for p in (vec_path, meta_path):
        if not p.is_file():
            raise FeaturesError(f"{folder} is not a features folder: {p.name} is missing "
                                f"(write one with `dictlearn export CONFIG.toml`)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise FeaturesError(f"{meta_path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FeaturesError(f"{meta_path}: not a {FORMAT} file (format is {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FeaturesError(f"{meta_path}: format_version {meta.get('format_version')!r}; this dictlearn reads {FORMAT_VERSION}")
    missing = [k for k in ("hookpoint", "n_features", "width", "dtype", "sha256") if k not in meta]
    if missing:
        raise FeaturesError(f"{meta_path}: missing key(s) {', '.join(missing)}")
    try:
        tensors = load_file(str(vec_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FeaturesError(f"{vec_path}: unreadable safetensors file ({e}); re-export it") from e
    if set(tensors) != {TENSOR}:
        raise FeaturesError(f"{vec_path}: expected one tensor named {TENSOR!r}, found {sorted(tensors)}")
    v = tensors[TENSOR]
    if v.dtype != np.float32 or meta["dtype"] != "float32":
        raise FeaturesError(f"{vec_path}: vectors have dtype {v.dtype} (the JSON says {meta['dtype']}); expected float32")
    expected = (meta["n_features"], meta["width"])
    if v.shape != expected:
        raise FeaturesError(f"{vec_path}: vectors have shape {v.shape}, but {META_FILE} says "
                            f"(n_features, width) = {expected}")
    got = checksum(v)
    if got != meta["sha256"]:
        raise FeaturesError(f"{vec_path}: checksum mismatch (sha256 {got[:12]}..., {META_FILE} says "
                            f"{str(meta['sha256'])[:12]}...): the vectors changed after export; re-export them")
    return FeatureSet(vectors=v, hookpoint=meta["hookpoint"], model=meta.get("model"), source=meta.get("source") or {},
                      model_fingerprint=meta.get("model_fingerprint"))
