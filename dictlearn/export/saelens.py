"""SAELens's on-disk format: `cfg.json` + `sae_weights.safetensors`, written and read without SAELens.

What SAELens (6.x) loads with `SAE.load_from_disk(folder)`:
- weights: `W_enc` (d_in, d_sae), `b_enc` (d_sae,), `W_dec` (d_sae, d_out), `b_dec` (d_out,), plus `threshold`
  (d_sae,) for JumpReLU kinds and `W_skip` (d_out, d_in) for skip transcoders;
- cfg.json: `architecture` (standard | topk | jumprelu | transcoder | skip_transcoder | jumprelu_transcoder |
  jumprelu_skip_transcoder), `d_in`, `d_sae`, `d_out` (transcoders), `k` and `rescale_acts_by_decoder_norm`
  (topk), `dtype`, `device`, `apply_b_dec_to_input` (subtract b_dec from the input before encoding),
  `normalize_activations`, `reshape_activations`, and `metadata` (model_name, hook_name, hook_name_out, ...).

Exports are written with `normalize_activations = "none"`: the trainer already folded its input scaling into
the weights, so the folder reads and writes raw activations. BatchTopK is written as `jumprelu` with its
inference threshold, as SAELens itself saves BatchTopK SAEs for inference; gradient TopK as plain `topk`
(its encoding without gradients). SAELens has no TopK transcoder, so TopK transcoders export only their
native folder and steering vectors.

Hook names: SAELens/TransformerLens names (`blocks.10.hook_resid_post`) go in `metadata.hook_name`, the
Hugging Face module path in `metadata.hf_hook_name`, and dictlearn's own name in `metadata.dictlearn_hookpoint`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from dictlearn.export.linear import LinearDictionary

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens >= 6 reads it as is)

# dictlearn alias -> TransformerLens hook name. mlp_in is the MLP's (normalised) input, TL's ln2 output.
_TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_hidden": "mlp.hook_post",
    "mlp_in": "ln2.hook_normalized",
}
_FROM_TL = {v: k for k, v in _TL_HOOKS.items()}
_ARCH_SPARSITY = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
_RUNTIME_NORMS = ("layer_norm", "constant_norm_rescale", "covariance_whitening")


class SaeLensFormatError(ValueError):
    """A dictionary SAELens's format cannot hold, or a SAELens folder dictlearn cannot read."""


def tl_hook_name(hookpoint: str) -> str | None:
    """TransformerLens hook name of a dictlearn alias (`resid_post.10` -> `blocks.10.hook_resid_post`)."""
    m = re.fullmatch(r"([a-z_]+)\.(\d+)", hookpoint or "")
    if m and m.group(1) in _TL_HOOKS:
        return f"blocks.{m.group(2)}.{_TL_HOOKS[m.group(1)]}"
    return None


def hookpoint_from_tl(hook_name: str) -> str | None:
    """dictlearn alias of a TransformerLens hook name, or None when it has no exact counterpart."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name or "")
    if m and m.group(2) in _FROM_TL:
        return f"{_FROM_TL[m.group(2)]}.{m.group(1)}"
    return None


def architecture_of(lin: LinearDictionary) -> str:
    """The SAELens architecture name that computes `lin` exactly (SaeLensFormatError if none does)."""
    if not lin.is_transcoder:
        return {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[lin.sparsity]
    if lin.sparsity == "topk":
        raise SaeLensFormatError("SAELens has no TopK transcoder architecture (its transcoders use ReLU or JumpReLU); "
                                 "this transcoder is exported as its native folder and steering vectors only")
    skip = "skip_" if lin.W_skip is not None else ""
    return f"{'jumprelu_' if lin.sparsity == 'jumprelu' else ''}{skip}transcoder"


def to_saelens(lin: LinearDictionary, metadata: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(cfg.json dict, weights) for `lin` in SAELens's layout."""
    arch = architecture_of(lin)
    if not lin.is_transcoder and lin.b_pre is not None and np.array_equal(lin.b_pre, lin.b_dec):
        apply_b_dec = True  # the tied pre-encoder bias of SAELens/sparsify SAEs: exact as is
    else:
        apply_b_dec, lin = False, lin.without_input_bias()
    weights = {"W_enc": lin.W_enc, "b_enc": lin.b_enc, "W_dec": lin.W_dec, "b_dec": lin.b_dec}
    if lin.sparsity == "jumprelu":
        weights["threshold"] = lin.threshold
    if lin.W_skip is not None:
        weights["W_skip"] = lin.W_skip
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None}
    for key, hp in (("hook_name", lin.hookpoint_in), ("hook_name_out", lin.hookpoint_out if lin.is_transcoder else None)):
        if hp:
            meta[key] = tl_hook_name(hp) or hp
    meta["dictlearn_hookpoint"] = lin.hookpoint_in
    if lin.is_transcoder:
        meta["dictlearn_hookpoint_out"] = lin.hookpoint_out
    meta.update(metadata or {})
    cfg: dict[str, Any] = {"architecture": arch, "d_in": lin.d_in, "d_sae": lin.n_features, "dtype": "float32",
                           "device": "cpu", "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
                           "reshape_activations": "none", "metadata": meta}
    if arch == "topk":
        cfg.update(k=int(lin.k), rescale_acts_by_decoder_norm=False)
    if lin.is_transcoder:
        cfg["d_out"] = lin.d_out
    return cfg, weights


def write_saelens(lin: LinearDictionary, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `folder/cfg.json` and `folder/sae_weights.safetensors` (file by file, atomically)."""
    cfg, weights = to_saelens(lin, metadata)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    tmpc = folder / (CFG_FILE + ".tmp")
    tmpc.write_text(json.dumps(cfg, indent=2))
    tmpc.replace(folder / CFG_FILE)
    return folder


def _modernise(cfg: dict[str, Any]) -> dict[str, Any]:
    """Accept pre-6.0 SAELens configs (flat metadata, hook_point, activation_fn_str) like SAELens does."""
    cfg = dict(cfg)
    meta = dict(cfg.get("metadata") or {})
    for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)
    for key in ("model_name", "hook_name", "hook_name_out", "hf_hook_name", "hf_hook_name_out",
                "dictlearn_hookpoint", "dictlearn_hookpoint_out", "hook_head_index"):
        if key in cfg and key not in meta:
            meta[key] = cfg[key]
    cfg["metadata"] = meta
    if "architecture" not in cfg:
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        cfg["architecture"] = "topk" if act == "topk" and k is not None else "standard"
        if cfg["architecture"] == "topk":
            cfg["k"] = k
        elif act != "relu":
            raise SaeLensFormatError(f"pre-6.0 SAELens config with activation_fn {act!r}: only relu and topk are supported")
        cfg.setdefault("apply_b_dec_to_input", True)
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool) or norm is None:
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return cfg


def read_saelens(folder: str | Path, hookpoint: str | None = None, hookpoint_out: str | None = None
                 ) -> tuple[LinearDictionary, dict[str, Any]]:
    """Read a SAELens folder into a LinearDictionary (float32) and its (normalised) cfg dict.

    Hookpoints come from `metadata.dictlearn_hookpoint`, else from the TransformerLens hook name, else
    from `metadata.hf_hook_name` (a module path); pass `hookpoint` (and `hookpoint_out`) to override."""
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SaeLensFormatError(f"{folder} is not a SAELens folder: {p.name} is missing")
    try:
        cfg = _modernise(json.loads(cfg_path.read_text()))
        w = load_file(str(w_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise SaeLensFormatError(f"{folder}: unreadable SAELens folder ({e})") from e
    arch = cfg["architecture"]
    if arch not in _ARCH_SPARSITY:
        raise SaeLensFormatError(f"{cfg_path}: architecture {arch!r} has no dictlearn counterpart; "
                                 f"supported: {', '.join(_ARCH_SPARSITY)}")
    sparsity, transcoder, skip = _ARCH_SPARSITY[arch]
    norm = cfg.get("normalize_activations", "none")
    if norm in _RUNTIME_NORMS:
        raise SaeLensFormatError(f"{cfg_path}: normalize_activations = {norm!r} rescales each input at run time, "
                                 "which a dictlearn decomposer cannot do; fold it into the weights in SAELens first")
    if norm == "expected_average_only_in":
        warnings.warn(f"{cfg_path}: normalize_activations = 'expected_average_only_in' without its scaling factor: "
                      "imported as is (as SAELens's load_from_disk does), so it expects normalised activations")
    if cfg.get("reshape_activations", "none") == "hook_z" and hookpoint is None:
        raise SaeLensFormatError(f"{cfg_path}: a hook_z SAE reads per-head attention outputs; pass the hookpoint "
                                 "of their flattened form, e.g. --hookpoint model.layers.L.self_attn.o_proj:input")
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if sparsity == "jumprelu" else []) + (["W_skip"] if skip else [])
    missing = [k for k in need if k not in w]
    if missing:
        raise SaeLensFormatError(f"{w_path}: architecture {arch!r} needs {', '.join(need)}; missing {', '.join(missing)}")
    arr = {k: np.asarray(w[k], dtype=np.float32) for k in need}
    meta = cfg.get("metadata") or {}
    hp_in = hookpoint or meta.get("dictlearn_hookpoint") or hookpoint_from_tl(meta.get("hook_name", "")) or meta.get("hf_hook_name")
    if not hp_in:
        raise SaeLensFormatError(f"{cfg_path}: cannot tell the hookpoint (hook_name {meta.get('hook_name')!r} has no "
                                 "dictlearn counterpart and hf_hook_name is missing); pass it with --hookpoint")
    hp_out = hp_in
    if transcoder:
        hp_out = (hookpoint_out or meta.get("dictlearn_hookpoint_out") or hookpoint_from_tl(meta.get("hook_name_out", ""))
                  or meta.get("hf_hook_name_out"))
        if not hp_out:
            raise SaeLensFormatError(f"{cfg_path}: a transcoder needs the hookpoint it writes to (hook_name_out "
                                     f"{meta.get('hook_name_out')!r} has no dictlearn counterpart); pass --hookpoint-out")
    elif hookpoint_out and hookpoint_out != hp_in:
        raise SaeLensFormatError(f"{cfg_path}: architecture {arch!r} reads and writes one hookpoint; "
                                 f"got --hookpoint-out {hookpoint_out!r} != {hp_in!r}")
    W_enc, b_enc, W_dec = arr["W_enc"], arr["b_enc"], arr["W_dec"]
    k = None
    if sparsity == "topk":
        k = int(cfg["k"])
        if cfg.get("rescale_acts_by_decoder_norm", False):
            # SAELens picks the top k of pre * |W_dec row| and decodes (acts / |row|) @ W_dec: fold the norms
            norms = np.maximum(np.linalg.norm(W_dec.astype(np.float64), axis=1), 1e-8)
            W_enc = (W_enc * norms[None, :]).astype(np.float32)
            b_enc = (b_enc * norms).astype(np.float32)
            W_dec = (W_dec / norms[:, None]).astype(np.float32)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", False)) and not transcoder
    lin = LinearDictionary(
        sparsity=sparsity, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=arr["b_dec"],
        b_pre=arr["b_dec"].copy() if apply_b_dec else None, threshold=arr.get("threshold"), k=k,
        W_skip=arr.get("W_skip"), hookpoint_in=hp_in, hookpoint_out=hp_out)
    return lin, cfg


def export_saelens(module: Any, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a dictlearn decomposer as a SAELens folder (SaeLensFormatError when SAELens cannot hold it)."""
    from dictlearn.export.kinds import to_linear

    return write_saelens(to_linear(module), folder, metadata)


def import_saelens(folder: str | Path, hookpoint: str | None = None, hookpoint_out: str | None = None) -> Any:
    """A dictlearn decomposer computing what the SAELens folder computes."""
    from dictlearn.export.kinds import from_linear

    lin, _ = read_saelens(folder, hookpoint, hookpoint_out)
    return from_linear(lin)
