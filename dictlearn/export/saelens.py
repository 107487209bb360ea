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

Versions: `metadata.sae_lens_version` is the SAELens config layout these files follow ("6.0.0"); SAELens's
loader reads that field only to choose between its pre-6.0 and its 6.x parsing, so it must name the layout,
not a SAELens that was never run. What actually wrote the folder is `metadata.dictlearn_version`, and
`sae_lens_training_version` is null (SAELens did not train it).

Reading checks the folder before converting it: cfg.json's `d_in` / `d_sae` / `d_out` against the weights'
shapes, the weights' shapes against each other, `k` against the width, and finite values, and each problem
is a SaeLensFormatError naming the field or tensor.

Hook names: SAELens/TransformerLens names (`blocks.10.hook_resid_post`) go in `metadata.hook_name`, the
Hugging Face module path in `metadata.hf_hook_name`, and dictlearn's own name in `metadata.dictlearn_hookpoint`.
"""

from __future__ import annotations

import json
import re
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from dictlearn.activations.families import ALIASES, hookpoint_from_tl, parse_alias, tl_hook_name  # noqa: F401 (re-exported)
from dictlearn.export.linear import LinearDictionary
from dictlearn.files import atomic_save_safetensors, atomic_write_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens >= 6 reads it as is)


def dictlearn_version() -> str:
    """The installed dictlearn's version, recorded in what it writes."""
    try:
        return version("dictlearn")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


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


_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*(:input)?")


def hookpoint_problem(name: str) -> str | None:
    """Why `name` cannot be a dictlearn hookpoint, judged by its form alone (None: it can be).

    A hookpoint is an alias with its layer (`mlp_out.6`) or one module path, optionally ending in `:input`
    (`model.layers.6.mlp`); whether the model has it is checked when the model is loaded."""
    if parse_alias(name):
        return None
    stem = name.split(".")[0].split(":")[0]
    if stem in ALIASES:
        return f"{name!r}: the alias {stem!r} takes a layer index and nothing else (write e.g. {stem}.6)"
    if _MODULE_PATH.fullmatch(name):
        return None
    return (f"{name!r} is neither an alias with its layer ({', '.join(a + '.L' for a in ALIASES)}) nor a module "
            f"path such as model.layers.6.mlp (optionally ending in ':input')")


def _as_hookpoint(name: str, where: str, flag: str) -> str:
    """A hookpoint given by the user or a folder, TransformerLens names mapped to aliases, its form checked."""
    name = hookpoint_from_tl(name) or name
    problem = hookpoint_problem(name)
    if problem:
        raise SaeLensFormatError(f"{where}: {problem}; pass the right one with {flag}")
    return name


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
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
            "dictlearn_version": dictlearn_version()}
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
    atomic_save_safetensors(folder / WEIGHTS_FILE, {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    atomic_write_json(folder / CFG_FILE, cfg, indent=2)
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


def _check_weights(cfg: dict[str, Any], arr: dict[str, np.ndarray], transcoder: bool, cfg_path: Path, w_path: Path
                   ) -> int | None:
    """cfg.json's sizes against the weights' shapes, the shapes against each other, k against the width and
    finite values; returns k (topk) or None. Each problem is a SaeLensFormatError naming the field or tensor."""
    if arr["W_enc"].ndim != 2:
        raise SaeLensFormatError(f"{w_path}: W_enc has shape {arr['W_enc'].shape}; a SAELens W_enc is (d_in, d_sae)")
    d_in, d_sae = arr["W_enc"].shape
    d_out = arr["W_dec"].shape[-1] if transcoder and arr["W_dec"].ndim == 2 else d_in
    for field, got in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        said = cfg.get(field)
        if field == "d_out" and not transcoder:
            continue
        if said is not None and said != got:
            raise SaeLensFormatError(f"{cfg_path}: {field} is {said!r} but the weights say {got} (W_enc is "
                                     f"{arr['W_enc'].shape} = (d_in, d_sae), W_dec is {arr['W_dec'].shape} = "
                                     f"(d_sae, d_out)); the config does not belong to these weights")
    want = {"b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "threshold": (d_sae,), "W_skip": (d_out, d_in)}
    problem = weights_problem(arr, want, f"W_enc {arr['W_enc'].shape} (and d_out {d_out})")
    if problem:
        raise SaeLensFormatError(f"{w_path}: {problem}")
    if cfg["architecture"] != "topk":
        return None
    problem = k_problem(cfg.get("k"), d_sae, "a topk SAE", "d_sae")
    if problem:
        raise SaeLensFormatError(f"{cfg_path}: {problem}")
    return cfg["k"]


def weights_problem(arrays: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], basis: str) -> str | None:
    """The first tensor whose shape is not the one `basis` (the tensor that fixes the sizes) makes it, or
    that holds nan/inf; None when every tensor fits. Shared by the foreign-format readers."""
    for name, shape in want.items():
        if name in arrays and arrays[name].shape != shape:
            return f"{name} has shape {arrays[name].shape} but {basis} makes it {shape}; the weights do not fit together"
    for name, a in arrays.items():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            return f"{name} holds {bad} nan or infinite value(s)"
    return None


def k_problem(k: Any, width: int, what: str, width_name: str) -> str | None:
    """Why `k` cannot be a top-k count for `width` latents (None: it can)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        return f"k is {k!r}, but {what} keeps between 1 and {width_name} = {width} latents"
    return None


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
        raw = json.loads(cfg_path.read_text())
        w = load_file(str(w_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise SaeLensFormatError(f"{folder}: unreadable SAELens folder ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("metadata", {}), (dict, type(None))):
        raise SaeLensFormatError(f"{cfg_path}: not a SAELens config (expected a JSON object with a metadata object)")
    cfg = _modernise(raw)
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
    k = _check_weights(cfg, arr, transcoder, cfg_path, w_path)
    meta = cfg.get("metadata") or {}
    where = str(cfg_path)
    if hookpoint:
        hp_in = _as_hookpoint(hookpoint, "--hookpoint", "--hookpoint")
    else:
        hp_in = meta.get("dictlearn_hookpoint") or hookpoint_from_tl(meta.get("hook_name", "")) or meta.get("hf_hook_name")
        if not hp_in:
            raise SaeLensFormatError(f"{cfg_path}: cannot tell the hookpoint (hook_name {meta.get('hook_name')!r} has "
                                     "no dictlearn counterpart and hf_hook_name is missing); pass it with --hookpoint")
        hp_in = _as_hookpoint(hp_in, where, "--hookpoint")
    hp_out = hp_in
    if transcoder:
        hp_out = (hookpoint_out or meta.get("dictlearn_hookpoint_out") or hookpoint_from_tl(meta.get("hook_name_out", ""))
                  or meta.get("hf_hook_name_out"))
        if not hp_out:
            raise SaeLensFormatError(f"{cfg_path}: a transcoder needs the hookpoint it writes to (hook_name_out "
                                     f"{meta.get('hook_name_out')!r} has no dictlearn counterpart); pass --hookpoint-out")
        hp_out = _as_hookpoint(hp_out, "--hookpoint-out" if hookpoint_out else where, "--hookpoint-out")
    elif hookpoint_out and hookpoint_out != hp_in:
        raise SaeLensFormatError(f"{cfg_path}: architecture {arch!r} reads and writes one hookpoint; "
                                 f"got --hookpoint-out {hookpoint_out!r} != {hp_in!r}")
    W_enc, b_enc, W_dec = arr["W_enc"], arr["b_enc"], arr["W_dec"]
    if sparsity == "topk":
        if cfg.get("rescale_acts_by_decoder_norm", False):
            # SAELens picks the top k of pre * |W_dec row| and decodes (acts / |row|) @ W_dec: fold the norms
            norms = np.maximum(np.linalg.norm(W_dec.astype(np.float64), axis=1), 1e-8)
            W_enc = (W_enc * norms[None, :]).astype(np.float32)
            b_enc = (b_enc * norms).astype(np.float32)
            W_dec = (W_dec / norms[:, None]).astype(np.float32)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", False)) and not transcoder
    try:
        lin = LinearDictionary(
            sparsity=sparsity, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=arr["b_dec"],
            b_pre=arr["b_dec"].copy() if apply_b_dec else None, threshold=arr.get("threshold"), k=k,
            W_skip=arr.get("W_skip"), hookpoint_in=hp_in, hookpoint_out=hp_out)
    except ValueError as e:  # a check above should have said it first; never a traceback
        raise SaeLensFormatError(f"{folder}: {e}") from e
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
