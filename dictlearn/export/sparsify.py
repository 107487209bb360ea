"""Read dictionaries saved by EleutherAI's sparsify (`SparseCoder.save_to_disk`) without sparsify.

Layout: one folder per hookpoint, each with
- `cfg.json`: {"activation": "topk" | "groupmax", "k", "num_latents", "expansion_factor", "normalize_decoder",
  "multi_topk", "skip_connection", "transcode", "d_in"};
- `sae.safetensors`: `encoder.weight` (n, d_in), `encoder.bias` (n,), `W_dec` (n, d_in), `b_dec` (d_in,),
  and `W_skip` (d_in, d_in) with a skip connection.
A training run saves a folder holding one such subfolder per hookpoint, named by the module path
relative to the model's base (`layers.10`, `layers.10.mlp`).

Math: pre = (x - b_dec) @ encoder.weight.T + encoder.bias (no b_dec subtraction when transcoding);
codes = top k of relu(pre); y_hat = codes @ W_dec + b_dec (+ x @ W_skip.T). A transcoder reads the
module's input and predicts its output. The `groupmax` activation has no dictlearn counterpart.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from dictlearn.export.linear import LinearDictionary

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


class SparsifyFormatError(ValueError):
    """A folder that is not a readable sparsify dictionary."""


def is_sparsify_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def hookpoints_for(name: str, transcode: bool, prefix: str = "model.") -> tuple[str, str]:
    """dictlearn (hookpoint_in, hookpoint_out) for a sparsify hookpoint name (relative to the base model).

    `layers.L` -> resid_post.L; `layers.L.mlp` -> mlp_out.L (transcoding: mlp_in.L -> mlp_out.L);
    `layers.L.self_attn` -> attn_out.L; anything else -> the module path `prefix + name`
    (with `:input` for a transcoder's input)."""
    m = re.fullmatch(r"(?:layers|h|blocks)\.(\d+)(?:\.(mlp|self_attn|attn))?", name)
    if m:
        layer, part = m.group(1), m.group(2)
        if part is None:
            return (f"resid_pre.{layer}" if transcode else f"resid_post.{layer}"), f"resid_post.{layer}"
        if part == "mlp":
            return (f"mlp_in.{layer}" if transcode else f"mlp_out.{layer}"), f"mlp_out.{layer}"
        if not transcode:
            return f"attn_out.{layer}", f"attn_out.{layer}"
    path = prefix + name
    return (path + ":input" if transcode else path), path


def read_sparsify(folder: str | Path, hookpoint: str | None = None, hookpoint_out: str | None = None,
                  prefix: str = "model.") -> LinearDictionary:
    """One sparsify folder (cfg.json + sae.safetensors) as a LinearDictionary.

    The hookpoint is derived from the folder's name (see `hookpoints_for`) unless given."""
    folder = Path(folder)
    if not is_sparsify_folder(folder):
        raise SparsifyFormatError(f"{folder} is not a sparsify folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
        w = load_file(str(folder / WEIGHTS_FILE))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise SparsifyFormatError(f"{folder}: unreadable sparsify folder ({e})") from e
    if cfg.get("activation", "topk") != "topk":
        raise SparsifyFormatError(f"{folder / CFG_FILE}: activation {cfg.get('activation')!r} has no dictlearn "
                                  "counterpart; only topk sparse coders can be imported")
    need = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if cfg.get("skip_connection") else [])
    missing = [k for k in need if k not in w]
    if missing:
        raise SparsifyFormatError(f"{folder / WEIGHTS_FILE}: missing {', '.join(missing)} (a sparse coder saved "
                                  "without its decoder cannot reconstruct)")
    enc = np.asarray(w["encoder.weight"], dtype=np.float32)
    d_in = int(cfg.get("d_in", enc.shape[1]))
    if enc.shape[1] != d_in:
        raise SparsifyFormatError(f"{folder}: encoder.weight is {enc.shape} but cfg.json says d_in {d_in}")
    transcode = bool(cfg.get("transcode", False))
    auto_in, auto_out = hookpoints_for(folder.name, transcode, prefix)
    hp_in = hookpoint or auto_in
    hp_out = hookpoint_out or (auto_out if transcode else hp_in)
    b_dec = np.asarray(w["b_dec"], dtype=np.float32)
    return LinearDictionary(
        sparsity="topk", W_enc=enc.T, b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=b_dec,
        b_pre=None if transcode else b_dec.copy(), k=int(cfg["k"]),
        W_skip=w.get("W_skip") if cfg.get("skip_connection") else None, hookpoint_in=hp_in, hookpoint_out=hp_out)


def read_sparsify_run(folder: str | Path, prefix: str = "model.") -> dict[str, LinearDictionary]:
    """Every dictionary of a sparsify save folder: {hookpoint folder name: LinearDictionary}.

    `folder` may also be a single dictionary's folder (then the one entry is named after it)."""
    folder = Path(folder)
    if is_sparsify_folder(folder):
        return {folder.name: read_sparsify(folder, prefix=prefix)}
    subs = sorted((p for p in folder.iterdir() if p.is_dir() and is_sparsify_folder(p)), key=lambda p: p.name) if folder.is_dir() else []
    if not subs:
        raise SparsifyFormatError(f"{folder} holds no sparsify dictionary: expected {CFG_FILE} + {WEIGHTS_FILE} in it "
                                  "or in its per-hookpoint subfolders")
    return {p.name: read_sparsify(p, prefix=prefix) for p in subs}


def import_sparsify(folder: str | Path, prefix: str = "model.") -> dict[str, Any]:
    """{name: dictlearn decomposer} for every dictionary of a sparsify folder."""
    from dictlearn.export.kinds import from_linear

    return {name: from_linear(lin) for name, lin in read_sparsify_run(folder, prefix).items()}
