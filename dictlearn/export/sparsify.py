"""Read dictionaries saved by EleutherAI's sparsify (`SparseCoder.save_to_disk`) without sparsify.

Layout: one folder per hookpoint, each with
- `cfg.json`: {"activation": "topk" | "groupmax", "k", "num_latents", "expansion_factor", "normalize_decoder",
  "multi_topk", "skip_connection", "transcode", "d_in"};
- `sae.safetensors`: `encoder.weight` (n, d_in), `encoder.bias` (n,), `W_dec` (n, d_in), `b_dec` (d_in,),
  and `W_skip` (d_in, d_in) with a skip connection.
A training run saves a folder holding one such subfolder per hookpoint, named by the module path
relative to the model's base (`layers.10`, `layers.10.mlp`). A folder whose name is not such a path (renamed,
or a single dictionary saved elsewhere) reads only with the hookpoint given (`--hookpoint`); it is refused at
import rather than imported under a made-up hookpoint that fails later.

Reading checks cfg.json (`d_in`, `num_latents` or `expansion_factor`, `k`) against the weights' shapes, the
shapes against each other and the values for nan/inf, naming the field or tensor that disagrees.

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
from dictlearn.export.saelens import hookpoint_problem, k_problem, weights_problem

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


class SparsifyFormatError(ValueError):
    """A folder that is not a readable sparsify dictionary."""


def is_sparsify_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


_LAYER_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\.\d+(\.\w+)*")  # a module inside a numbered block


def hookpoints_for(name: str, transcode: bool, prefix: str = "model.") -> tuple[str, str] | None:
    """dictlearn (hookpoint_in, hookpoint_out) for a sparsify hookpoint name (relative to the base model), or
    None when `name` is not a module path inside a decoder block (then the hookpoint must be given).

    `layers.L` -> resid_post.L; `layers.L.mlp` -> mlp_out.L (transcoding: mlp_in.L -> mlp_out.L);
    `layers.L.self_attn` -> attn_out.L; any other path inside a block -> the module path `prefix + name`
    (with `:input` for a transcoder's input). sparsify hooks the module's own output, which is what mlp_out.L /
    attn_out.L name in families without post-norms; for Gemma 2/3 and OLMo 2 pass --hookpoint-out
    mlp_out_pre_norm.L (a transcoder) or --hookpoint mlp_out_pre_norm.L (an SAE)."""
    m = re.fullmatch(r"(?:layers|h|blocks)\.(\d+)(?:\.(mlp|self_attn|attn))?", name)
    if m:
        layer, part = m.group(1), m.group(2)
        if part is None:
            return (f"resid_pre.{layer}" if transcode else f"resid_post.{layer}"), f"resid_post.{layer}"
        if part == "mlp":
            return (f"mlp_in.{layer}" if transcode else f"mlp_out.{layer}"), f"mlp_out.{layer}"
        if not transcode:
            return f"attn_out.{layer}", f"attn_out.{layer}"
    if not _LAYER_MODULE.fullmatch(name):
        return None
    path = prefix + name
    return (path + ":input" if transcode else path), path


def _given(name: str, flag: str) -> str:
    problem = hookpoint_problem(name)
    if problem:
        raise SparsifyFormatError(f"{flag}: {problem}")
    return name


def _hookpoints(folder: Path, transcode: bool, prefix: str, hookpoint: str | None, hookpoint_out: str | None
                ) -> tuple[str, str]:
    """(hookpoint_in, hookpoint_out): the ones given (form checked), else those the folder's name maps to."""
    auto = hookpoints_for(folder.name, transcode, prefix)
    if hookpoint is None and auto is None:
        flags = "--hookpoint and --hookpoint-out (what the transcoder reads and writes)" if transcode else "--hookpoint"
        raise SparsifyFormatError(
            f"{folder}: the folder's name {folder.name!r} is not a sparsify hookpoint (a module path inside a decoder "
            f"block, relative to the model's base, such as layers.10 or layers.10.mlp), so where this dictionary "
            f"reads is unknown; pass it with {flags}, e.g. --hookpoint resid_post.10")
    hp_in = _given(hookpoint, "--hookpoint") if hookpoint else auto[0]
    if not transcode:
        if hookpoint_out and hookpoint_out != hp_in:
            raise SparsifyFormatError(f"{folder}: this sparse coder reconstructs its input, so it writes where it "
                                      f"reads; got --hookpoint-out {hookpoint_out!r} != {hp_in!r}")
        return hp_in, hp_in
    if hookpoint_out:
        return hp_in, _given(hookpoint_out, "--hookpoint-out")
    if auto is None:
        raise SparsifyFormatError(f"{folder}: a transcoder also needs the hookpoint it writes to, which the folder's "
                                  f"name {folder.name!r} does not tell; pass --hookpoint-out")
    return hp_in, auto[1]


def _check_weights(folder: Path, cfg: dict[str, Any], w: dict[str, np.ndarray]) -> tuple[int, int]:
    """(d_in, n_latents) after checking cfg.json against the weights and the weights against each other."""
    enc = w["encoder.weight"]
    if enc.ndim != 2:
        raise SparsifyFormatError(f"{folder / WEIGHTS_FILE}: encoder.weight has shape {enc.shape}; sparsify's is (num_latents, d_in)")
    n, d_in = enc.shape
    factor = cfg.get("expansion_factor")
    said_n = cfg.get("num_latents") or (factor * d_in if isinstance(factor, int) and factor > 0 else None)
    for field, said, got in (("d_in", cfg.get("d_in"), d_in), ("num_latents", said_n, n)):
        if said is not None and said != got:
            what = field if field == "d_in" or cfg.get("num_latents") else "expansion_factor x d_in"
            raise SparsifyFormatError(f"{folder / CFG_FILE}: {what} is {said!r} but encoder.weight is {enc.shape} = "
                                      f"(num_latents, d_in); the config does not belong to these weights")
    want = {"encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,), "W_skip": (d_in, d_in)}
    problem = weights_problem(w, want, f"encoder.weight {enc.shape}")
    if problem:
        raise SparsifyFormatError(f"{folder / WEIGHTS_FILE}: {problem}")
    problem = k_problem(cfg.get("k"), n, "a top-k sparse coder", "num_latents")
    if problem:
        raise SparsifyFormatError(f"{folder / CFG_FILE}: {problem}")
    return d_in, n


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
    if not isinstance(cfg, dict):
        raise SparsifyFormatError(f"{folder / CFG_FILE}: not a sparsify config (expected a JSON object)")
    if cfg.get("activation", "topk") != "topk":
        raise SparsifyFormatError(f"{folder / CFG_FILE}: activation {cfg.get('activation')!r} has no dictlearn "
                                  "counterpart; only topk sparse coders can be imported")
    need = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if cfg.get("skip_connection") else [])
    missing = [k for k in need if k not in w]
    if missing:
        raise SparsifyFormatError(f"{folder / WEIGHTS_FILE}: missing {', '.join(missing)} (a sparse coder saved "
                                  "without its decoder cannot reconstruct)")
    w = {k: np.asarray(w[k], dtype=np.float32) for k in need}
    _check_weights(folder, cfg, w)
    transcode = bool(cfg.get("transcode", False))
    hp_in, hp_out = _hookpoints(folder, transcode, prefix, hookpoint, hookpoint_out)
    try:
        return LinearDictionary(
            sparsity="topk", W_enc=w["encoder.weight"].T, b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=w["b_dec"],
            b_pre=None if transcode else w["b_dec"].copy(), k=int(cfg["k"]), W_skip=w.get("W_skip"),
            hookpoint_in=hp_in, hookpoint_out=hp_out)
    except ValueError as e:  # a check above should have said it first; never a traceback
        raise SparsifyFormatError(f"{folder}: {e}") from e


def read_sparsify_run(folder: str | Path, prefix: str = "model.", hookpoint: str | None = None,
                      hookpoint_out: str | None = None) -> dict[str, LinearDictionary]:
    """Every dictionary of a sparsify save folder: {hookpoint folder name: LinearDictionary}.

    `folder` may also be a single dictionary's folder (then the one entry is named after it). A given
    `hookpoint` (and `hookpoint_out`) applies to a folder holding one dictionary only."""
    folder = Path(folder)
    if is_sparsify_folder(folder):
        return {folder.name: read_sparsify(folder, hookpoint, hookpoint_out, prefix)}
    subs = sorted((p for p in folder.iterdir() if p.is_dir() and is_sparsify_folder(p)), key=lambda p: p.name) if folder.is_dir() else []
    if not subs:
        raise SparsifyFormatError(f"{folder} holds no sparsify dictionary: expected {CFG_FILE} + {WEIGHTS_FILE} in it "
                                  "or in its per-hookpoint subfolders")
    if (hookpoint or hookpoint_out) and len(subs) > 1:
        raise SparsifyFormatError(f"{folder} holds {len(subs)} dictionaries ({', '.join(p.name for p in subs)}), so one "
                                  "--hookpoint cannot name where each reads; import them one folder at a time")
    return {p.name: read_sparsify(p, hookpoint, hookpoint_out, prefix) for p in subs}


def import_sparsify(folder: str | Path, prefix: str = "model.", hookpoint: str | None = None,
                    hookpoint_out: str | None = None) -> dict[str, Any]:
    """{name: dictlearn decomposer} for every dictionary of a sparsify folder."""
    from dictlearn.export.kinds import from_linear

    return {name: from_linear(lin) for name, lin in read_sparsify_run(folder, prefix, hookpoint, hookpoint_out).items()}
