"""Semi-NMF export: its factors and what `encode` needs, as safetensors + JSON.

Files (format "dictlearn-snmf", version 1):
- `snmf.safetensors`:
  - `F` float32 (d_mlp, K): feature k is column k, a signed combination of MLP neurons (unit norm);
  - `resid` float32 (K, d_model), when known: feature k written to the residual stream through the MLP's output
    projection, F[:, k] @ W_out. Adding alpha * resid[k] at `resid_hookpoint` (where the projection's output
    appears: mlp_out.L, or mlp_out_pre_norm.L in families with an MLP post-norm) is the same as adding
    alpha * F[:, k] to the MLP hidden activation at `hookpoint` (mlp_hidden.L).
- `snmf.json`: {"format", "format_version", "hookpoint", "resid_hookpoint", "model", "d_mlp", "n_features",
  "d_model", "encode": {"solver", "iters", "ridge", "eps"}, "sha256": {tensor name: hex digest of its raw
  little-endian bytes}, "config": dictlearn's native config}.

Encoding a (B, d_mlp) activation x reproduces dictlearn's `SemiNMF.encode`:
  P = x F, Q = F^T F; G0 = max(0, P (Q + ridge I)^-1)
  "pgd": `iters` FISTA steps G <- max(0, Y - (Y Q - P) / L), L = largest eigenvalue of Q, with Nesterov momentum
  "mu":  G0 += 1e-3 * max(colmax(G0), eps), then `iters` steps G <- G * sqrt((P+ + G Q-) / (P- + G Q+ + eps))
  (X+ = (|X| + X) / 2, X- = (|X| - X) / 2). Reconstruction: x_hat = G F^T.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from dictlearn.files import atomic_save_safetensors, atomic_write_json

FORMAT = "dictlearn-snmf"
FORMAT_VERSION = 1
TENSORS_FILE = "snmf.safetensors"
META_FILE = "snmf.json"


class SnmfFormatError(ValueError):
    """A semi-NMF export that cannot be read or written as asked."""


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def _unwrap(model: Any) -> Any:
    """The torch module of a LoadedModel (a torch module as it is)."""
    import torch

    return model if isinstance(model, torch.nn.Module) else model.model


def steering_directions(module: Any, model: Any = None) -> tuple[str, np.ndarray]:
    """(hookpoint, (K, d_model)): the semi-NMF's features in the residual stream, F^T W_out, and where they
    appear. The stored directions when the module holds them with their hookpoint; else from `model`'s MLP
    output projection (the model family's knowledge: `families.output_projection`)."""
    cfg = module.config
    if cfg.d_model > 0 and cfg.resid_hookpoint:
        return cfg.resid_hookpoint, np.asarray(module.resid_features(), dtype=np.float32)
    if model is None:
        raise SnmfFormatError(f"this semi-NMF ({cfg.hookpoint_in}) stores no residual directions with their hookpoint; "
                              "pass the language model so its MLP output weights can map the features")
    from dictlearn.activations.families import output_projection

    w_out, hookpoint = output_projection(_unwrap(model), cfg.hookpoint_in)
    if w_out.shape[0] != cfg.d_in:
        raise SnmfFormatError(f"the model's output projection at {cfg.hookpoint_in} has {w_out.shape[0]} "
                              f"inputs, but the semi-NMF has d_mlp {cfg.d_in}")
    return hookpoint, (np.asarray(module.F[...], dtype=np.float32).T @ w_out).astype(np.float32)


def residual_directions(module: Any, model: Any = None) -> np.ndarray:
    """(K, d_model): F^T W_out (see `steering_directions`)."""
    return steering_directions(module, model)[1]


def write_snmf(module: Any, folder: str | Path, model: Any = None, model_name: str | None = None) -> Path:
    """Write snmf.safetensors + snmf.json for a dictlearn SemiNMF (residual directions when known)."""
    from dictlearn.decomposers.snmf_solver import EPS, RIDGE

    cfg = module.config
    tensors = {"F": np.ascontiguousarray(np.asarray(module.F[...], dtype=np.float32))}
    resid_at = None
    try:
        resid_at, resid = steering_directions(module, model)
        tensors["resid"] = np.ascontiguousarray(resid)
    except SnmfFormatError:
        pass  # F alone still encodes and decodes; steering needs resid
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / TENSORS_FILE, tensors)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hookpoint": cfg.hookpoint_in,
        "resid_hookpoint": resid_at,
        "model": model_name, "d_mlp": cfg.d_in, "n_features": cfg.n_features,
        "d_model": int(tensors["resid"].shape[1]) if "resid" in tensors else 0,
        "encode": {"solver": cfg.encode_solver, "iters": cfg.encode_iters, "ridge": RIDGE, "eps": EPS},
        "sha256": {k: _sha(v) for k, v in tensors.items()},
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_json(folder / META_FILE, meta, indent=2)
    return folder


def read_snmf(folder: str | Path) -> Any:
    """A dictlearn SemiNMF from an snmf export, with shapes and checksums validated."""
    from dictlearn.decomposers import base, snmf  # noqa: F401  (registers the kind)

    folder = Path(folder)
    for name in (TENSORS_FILE, META_FILE):
        if not (folder / name).is_file():
            raise SnmfFormatError(f"{folder} is not a semi-NMF export: {name} is missing")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        tensors = load_file(str(folder / TENSORS_FILE))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise SnmfFormatError(f"{folder}: unreadable semi-NMF export ({e})") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SnmfFormatError(f"{folder / META_FILE}: not a {FORMAT} v{FORMAT_VERSION} file")
    f = tensors.get("F")
    if f is None or f.dtype != np.float32 or f.shape != (meta["d_mlp"], meta["n_features"]):
        raise SnmfFormatError(f"{folder / TENSORS_FILE}: F must be float32 (d_mlp, K) = "
                              f"{(meta['d_mlp'], meta['n_features'])}, got {None if f is None else (f.dtype, f.shape)}")
    for name, digest in meta["sha256"].items():
        if name not in tensors or _sha(tensors[name]) != digest:
            raise SnmfFormatError(f"{folder / TENSORS_FILE}: tensor {name!r} is missing or fails its checksum; re-export it")
    resid = tensors.get("resid")
    if resid is not None and resid.shape != (meta["n_features"], meta["d_model"]):
        raise SnmfFormatError(f"{folder / TENSORS_FILE}: resid has shape {resid.shape}, expected "
                              f"{(meta['n_features'], meta['d_model'])}")
    module = base.build("snmf", {**meta["config"], "d_model": 0 if resid is None else int(resid.shape[1]),
                                 "resid_hookpoint": meta.get("resid_hookpoint") or "" if resid is not None else ""})
    module.F[...] = jnp.asarray(f)  # as saved (set_features would renormalise)
    if resid is not None:
        module.resid[...] = jnp.asarray(resid)
    return module
