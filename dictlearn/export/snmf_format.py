"""Semi-NMF export: its factors and what `encode` needs, as safetensors + JSON.

Files (format "dictlearn-snmf", version 1):
- `snmf.safetensors`:
  - `F` float32 (d_mlp, K): feature k is column k, a signed combination of MLP neurons (unit norm);
  - `resid` float32 (K, d_model), when known: feature k written to the residual stream through the MLP's output
    projection, F[:, k] @ W_out. Adding alpha * resid[k] at `resid_hookpoint` (mlp_out.L) is the same as adding
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
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

FORMAT = "dictlearn-snmf"
FORMAT_VERSION = 1
TENSORS_FILE = "snmf.safetensors"
META_FILE = "snmf.json"


class SnmfFormatError(ValueError):
    """A semi-NMF export that cannot be read or written as asked."""


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def resid_hookpoint(hookpoint: str) -> str:
    """Where the MLP writes what its hidden activation holds: mlp_hidden.L -> mlp_out.L;
    a projection's input (`...down_proj:input`) -> that projection's output."""
    m = re.fullmatch(r"mlp_hidden\.(\d+)", hookpoint)
    if m:
        return f"mlp_out.{m.group(1)}"
    if hookpoint.endswith(":input"):
        return hookpoint[: -len(":input")]
    raise SnmfFormatError(f"cannot tell where the MLP whose hidden activation is {hookpoint!r} writes; "
                          "train semi-NMF on mlp_hidden.L or on an output projection's input (module.path:input)")


def w_out_from_model(model: Any, hookpoint: str) -> np.ndarray:
    """(d_mlp, d_model) output projection read from a torch model (Linear stores it transposed)."""
    import torch

    from dictlearn.activations.hookpoints import resolve

    module = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
    hp = resolve(module, [hookpoint], probe_widths=False)[0]
    proj = module.get_submodule(hp.module_path)
    weight = proj.weight.detach().float().cpu().numpy()
    return weight.T.copy() if isinstance(proj, torch.nn.Linear) else weight


def residual_directions(module: Any, model: Any = None) -> np.ndarray:
    """(K, d_model): the stored F^T W_out, or computed from `model`'s output projection."""
    if module.config.d_model > 0:
        return np.asarray(module.resid_features(), dtype=np.float32)
    if model is None:
        raise SnmfFormatError(f"this semi-NMF ({module.config.hookpoint_in}) stores no residual directions; "
                              "pass the language model so its MLP output weights can map the features")
    w_out = w_out_from_model(model, module.config.hookpoint_in)
    if w_out.shape[0] != module.config.d_in:
        raise SnmfFormatError(f"the model's output projection at {module.config.hookpoint_in} has {w_out.shape[0]} "
                              f"inputs, but the semi-NMF has d_mlp {module.config.d_in}")
    return (np.asarray(module.F[...], dtype=np.float32).T @ w_out).astype(np.float32)


def steering_directions(module: Any, model: Any = None) -> tuple[str, np.ndarray]:
    """(mlp_out hookpoint, (K, d_model) residual-stream directions) of a semi-NMF."""
    return resid_hookpoint(module.config.hookpoint_in), residual_directions(module, model)


def write_snmf(module: Any, folder: str | Path, model: Any = None, model_name: str | None = None) -> Path:
    """Write snmf.safetensors + snmf.json for a dictlearn SemiNMF (residual directions when known)."""
    from dictlearn.decomposers.snmf_solver import EPS, RIDGE

    cfg = module.config
    tensors = {"F": np.ascontiguousarray(np.asarray(module.F[...], dtype=np.float32))}
    try:
        tensors["resid"] = np.ascontiguousarray(residual_directions(module, model))
    except SnmfFormatError:
        pass  # F alone still encodes and decodes; steering needs resid
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (TENSORS_FILE + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / TENSORS_FILE)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hookpoint": cfg.hookpoint_in,
        "resid_hookpoint": resid_hookpoint(cfg.hookpoint_in) if "resid" in tensors else None,
        "model": model_name, "d_mlp": cfg.d_in, "n_features": cfg.n_features,
        "d_model": int(tensors["resid"].shape[1]) if "resid" in tensors else 0,
        "encode": {"solver": cfg.encode_solver, "iters": cfg.encode_iters, "ridge": RIDGE, "eps": EPS},
        "sha256": {k: _sha(v) for k, v in tensors.items()},
        "config": dataclasses.asdict(cfg),
    }
    tmpj = folder / (META_FILE + ".tmp")
    tmpj.write_text(json.dumps(meta, indent=2))
    tmpj.replace(folder / META_FILE)
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
    module = base.build("snmf", {**meta["config"], "d_model": 0 if resid is None else int(resid.shape[1])})
    module.F[...] = jnp.asarray(f)  # as saved (set_features would renormalise)
    if resid is not None:
        module.resid[...] = jnp.asarray(resid)
    return module
