"""circuit-tracer's on-disk formats (decoderesearch/circuit-tracer 0.5), written without circuit-tracer.

circuit-tracer builds attribution graphs from MLP transcoders. Its local loaders read two folder layouts, each
with a `config.yaml` naming `model_kind`, `feature_input_hook`, `feature_output_hook` (TransformerLens hook
names relative to block L) and `scan` (what its feature viewer calls the set):

- a transcoder set (`model_kind: transcoder_set`): `layer_{L}.safetensors` for every layer L = 0..n-1 with
  `W_enc` (F, d), `W_dec` (F, d), `b_enc` (F,), `b_dec` (d,), plus `activation_function.threshold` (F,) for
  JumpReLU and `W_skip` (d, d) for skip transcoders (it adds x @ W_skip.T); read by
  `circuit_tracer.transcoder.load_transcoder_set({L: path}, ...)` (its `load_relu_transcoder` per file);
- a cross-layer transcoder (`model_kind: cross_layer_transcoder`): `W_enc_{i}.safetensors` holding `W_enc_{i}`
  (F, d), `b_enc_{i}` (F,), `b_dec_{i}` (d,) and, for JumpReLU, `threshold_{i}` (F,); and
  `W_dec_{i}.safetensors` holding `W_dec_{i}` (F, n - i, d), layer i's writes to layers i..n-1; read by
  `circuit_tracer.transcoder.cross_layer_transcoder.load_clt(folder, ...)`.

Either folder also loads by name through circuit-tracer's local cache: `load_transcoders_from_cache(name,
cache_dir=parent)`, and `ReplacementModel.from_pretrained(model, name)` with CIRCUIT_TRACER_CACHE_DIR=parent.

What circuit-tracer computes, and how dictlearn's dictionaries are made to compute the same:
- codes = act(x @ W_enc.T + b_enc): no input bias, so dictlearn's b_in is folded into b_enc
  (b_enc - b_in @ W_enc); the trainer's input scaling is already folded into saved weights (raw activations);
- act is ReLU or JumpReLU x * (x > threshold). ReLU and JumpReLU transcoders map directly (a transcoder's
  threshold is written as max(threshold, 0), which computes the same as dictlearn's relu-then-gate), BatchTopK
  as JumpReLU with its inference threshold; a CLT's BatchTopK and JumpReLU codes are exactly x * (x > t).
  TopK (and gradient TopK) cannot be written: circuit-tracer's loaders only build ReLU or JumpReLU (its
  `TopK` class is never constructed by a loader), and a per-row top-k is no fixed threshold;
- input and output widths must both be the model's width (circuit-tracer's W_enc and W_dec share d_model),
  and the hookpoints must be one layer's MLP input and output (or its pre-norm output);
- every layer 0..n-1 needs a transcoder: layers without one are written as transcoders that never fire
  (all zeros), so circuit-tracer puts those MLPs wholly in its error nodes. Identical padding files are hard
  links of one file. A CLT's skip path: circuit-tracer's `load_clt` reads none, and dictlearn's CLT has none.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dictlearn.activations.families import Family, circuit_tracer_hook, parse_alias
from dictlearn.files import atomic_save_safetensors, atomic_write_text

CONFIG_FILE = "config.yaml"
FORMAT_VERSION = "circuit-tracer 0.5"  # the layouts above, as circuit-tracer 0.5.0's loaders read them


class CircuitTracerFormatError(ValueError):
    """A dictionary circuit-tracer's formats cannot hold; the message says why."""


@dataclass
class Layer:
    """One layer of a transcoder set in circuit-tracer's names, and where it came from."""

    layer: int
    input_hook: str
    output_hook: str
    tensors: dict[str, np.ndarray]
    source: str = ""  # the dictlearn name it came from (empty: padding)
    hookpoints: tuple[str, str] = ("", "")


@dataclass
class SetPlan:
    """Transcoders that go into one set folder: one per layer, the same hooks, width and skip path."""

    name: str
    members: dict[int, str] = field(default_factory=dict)  # layer -> decomposer name


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def site_hooks(hookpoint_in: str, hookpoint_out: str, family: Family | None = None) -> tuple[int, str, str]:
    """(layer, feature_input_hook, feature_output_hook) of a dictionary reading one hookpoint and writing another."""
    parsed_in, parsed_out = parse_alias(hookpoint_in), parse_alias(hookpoint_out)
    if parsed_in is None or parsed_out is None:
        raise CircuitTracerFormatError(
            f"circuit-tracer names sites per layer (mlp_in.L -> mlp_out.L); {hookpoint_in!r} -> {hookpoint_out!r} "
            "is not a pair of dictlearn aliases with their layer")
    hooks = circuit_tracer_hook(parsed_in[0], family), circuit_tracer_hook(parsed_out[0], family)
    if hooks[0] != "mlp.hook_in" or hooks[1] not in ("mlp.hook_out", "hook_mlp_out"):
        raise CircuitTracerFormatError(
            f"circuit-tracer's transcoders replace an MLP: they read mlp_in.L and write mlp_out.L (or "
            f"mlp_out_pre_norm.L); {hookpoint_in!r} -> {hookpoint_out!r} is not such a pair")
    if parsed_in[1] != parsed_out[1]:
        raise CircuitTracerFormatError(
            f"{hookpoint_in!r} -> {hookpoint_out!r}: circuit-tracer's per-layer transcoders read and write the "
            "same layer's MLP")
    return parsed_in[1], hooks[0], hooks[1]


def _check_codes_and_widths(what: str, topk: bool, d_in: int, d_out: int) -> None:
    """circuit-tracer's loaders build ReLU or JumpReLU codes only, and one width (d_model) in and out."""
    if topk:
        choices = "relu, jumprelu or batchtopk" if what == "transcoder" else "jumprelu or batchtopk"
        raise CircuitTracerFormatError(
            f"circuit-tracer has no TopK {what}: its loaders build ReLU or JumpReLU codes only, and a per-row top-k "
            f"is no fixed threshold (train the {what} with sparsity {choices} to trace circuits)")
    if d_in != d_out:
        raise CircuitTracerFormatError(f"circuit-tracer's {what}s read and write the model's width; this one reads "
                                       f"{d_in} and writes {d_out} dimensions")


def transcoder_layer(module: Any, family: Family | None = None, source: str = "") -> Layer:
    """A dictlearn (skip) transcoder as one circuit-tracer layer (CircuitTracerFormatError if it cannot be)."""
    from dictlearn.export.kinds import UnsupportedKindError, to_linear

    cfg = module.config
    try:
        lin = to_linear(module)
    except UnsupportedKindError as e:
        raise CircuitTracerFormatError(f"circuit-tracer: {e}") from None
    if not getattr(module, "transcoder", False):
        raise CircuitTracerFormatError(f"circuit-tracer reads transcoders (MLP input -> MLP output); kind "
                                       f"{module.kind!r} reads and writes one hookpoint")
    layer, hook_in, hook_out = site_hooks(cfg.hookpoint_in, cfg.hookpoint_out, family)
    _check_codes_and_widths("transcoder", lin.sparsity == "topk", lin.d_in, lin.d_out)
    lin = lin.without_input_bias()  # circuit-tracer has no input bias: b_enc - b_in @ W_enc
    tensors = {"W_enc": _f32(lin.W_enc.T), "W_dec": _f32(lin.W_dec), "b_enc": _f32(lin.b_enc), "b_dec": _f32(lin.b_dec)}
    if lin.sparsity == "jumprelu":
        # dictlearn keeps relu(pre) where pre > t; circuit-tracer keeps pre where pre > t: equal for t >= 0
        tensors["activation_function.threshold"] = _f32(np.maximum(lin.threshold, 0.0))
    if lin.W_skip is not None:
        tensors["W_skip"] = _f32(lin.W_skip)  # (d_out, d_in): circuit-tracer adds x @ W_skip.T
    return Layer(layer, hook_in, hook_out, tensors, source, (cfg.hookpoint_in, cfg.hookpoint_out))


def _set_key(layer: Layer) -> tuple:
    t = layer.tensors
    return (layer.input_hook, layer.output_hook, t["W_enc"].shape, "W_skip" in t)


def set_name(layer: Layer) -> str:
    """The folder name of the set a layer belongs to: its hooks' aliases, width and skip path."""
    stems = [parse_alias(h)[0] for h in layer.hookpoints]
    skip = "-skip" if "W_skip" in layer.tensors else ""
    return f"circuit-tracer-{stems[0]}-{stems[1]}-{layer.tensors['W_enc'].shape[0]}{skip}"


def plan_transcoder_sets(modules: dict[str, Any], family: Family | None = None
                         ) -> tuple[list[SetPlan], dict[str, str]]:
    """Group a run's transcoders into circuit-tracer sets: one set per (hooks, width, skip path), one
    transcoder per layer. Returns the sets and {name: why it is in none} (for transcoders and sets left out)."""
    groups: dict[tuple, SetPlan] = {}
    skipped: dict[str, str] = {}
    for name, module in modules.items():
        if not getattr(module, "transcoder", False) or getattr(module, "site_axis", False):
            continue  # SAEs and CLTs are not per-layer transcoders
        try:
            layer = transcoder_layer(module, family, name)
        except CircuitTracerFormatError as e:
            skipped[name] = str(e)
            continue
        plan = groups.setdefault(_set_key(layer), SetPlan(set_name(layer)))
        plan.members.setdefault(layer.layer, name)
        if plan.members[layer.layer] != name:
            other = plan.members[layer.layer]
            skipped[plan.name] = (f"layer {layer.layer} has two transcoders ({other}, {name}) of the same shape; "
                                  "a set holds one per layer: pick with export.decomposers or --only")
    return [p for p in groups.values() if p.name not in skipped], skipped


def to_yaml(config: dict[str, Any]) -> str:
    """config.yaml text: one `key: value` line per entry, each value in JSON form (valid YAML flow style)."""
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items())


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes a hard link of src (a copy where links are not possible), replacing dst atomically."""
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _remove_stale(folder: Path, pattern: str, keep: set[str]) -> None:
    """Files of an earlier export with more layers would be read back by circuit-tracer's globbing loaders."""
    for p in folder.glob(pattern):
        if p.name not in keep:
            p.unlink()


def _config(kind: str, input_hook: str, output_hook: str, scan: str | None, n_layers: int, sources: dict[int, str],
            metadata: dict[str, Any] | None) -> dict[str, Any]:
    from dictlearn.export.saelens import dictlearn_version

    return {"model_kind": kind, "feature_input_hook": input_hook, "feature_output_hook": output_hook, "scan": scan,
            **(metadata or {}), "n_layers": n_layers, "dictlearn_format": FORMAT_VERSION,
            "dictlearn_version": dictlearn_version(), "dictlearn_layers": {str(k): v for k, v in sorted(sources.items())},
            "dictlearn_padded_layers": [i for i in range(n_layers) if i not in sources]}


def write_transcoder_set(modules: dict[str, Any], folder: str | Path, n_layers: int = 0, family: Family | None = None,
                         scan: str | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write named per-layer transcoders as one circuit-tracer transcoder set in `folder`.

    n_layers: layers the set covers (0: up to the highest transcoder's layer; a graph needs the model's
    layer count). Returns a summary (files, layers, padded layers, hooks); also kept in config.yaml."""
    layers = [transcoder_layer(m, family, name) for name, m in modules.items()]
    if not layers:
        raise CircuitTracerFormatError("a transcoder set needs at least one transcoder")
    first = layers[0]
    for other in layers[1:]:
        if _set_key(other) != _set_key(first):
            raise CircuitTracerFormatError(
                f"{first.source} and {other.source} cannot share a set: circuit-tracer's set has one pair of hooks, "
                f"one width and a skip path in all layers or none ({_set_key(first)} vs {_set_key(other)})")
    by_layer: dict[int, Layer] = {}
    for layer in layers:
        if layer.layer in by_layer:
            raise CircuitTracerFormatError(f"layer {layer.layer} has two transcoders ({by_layer[layer.layer].source}, "
                                           f"{layer.source}); a set holds one per layer")
        by_layer[layer.layer] = layer
    top = max(by_layer) + 1
    n_layers = n_layers or top
    if n_layers < top:
        raise CircuitTracerFormatError(f"n_layers = {n_layers} leaves out layer {top - 1}, which has a transcoder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files, padding = [], None
    for i in range(n_layers):
        path = folder / f"layer_{i}.safetensors"
        if i in by_layer:
            atomic_save_safetensors(path, by_layer[i].tensors)
        elif padding is None:
            atomic_save_safetensors(path, {k: np.zeros_like(v) for k, v in first.tensors.items()})
            padding = path
        else:
            _link_or_copy(padding, path)
        files.append(path.name)
    _remove_stale(folder, "layer_*.safetensors", set(files))
    sources = {i: layer.source for i, layer in by_layer.items()}
    config = _config("transcoder_set", first.input_hook, first.output_hook, scan or folder.name, n_layers, sources,
                     metadata)
    atomic_write_text(folder / CONFIG_FILE, to_yaml(config))
    return {"files": [*files, CONFIG_FILE], **config}


def clt_layers(module: Any, family: Family | None = None) -> tuple[list[int], str, str, dict[str, np.ndarray]]:
    """A dictlearn CLT in circuit-tracer's terms: (model layers of its sites, input hook, output hook, arrays
    with the input bias folded: W_enc (L, F, d), b_enc (L, F), b_dec (L, d), threshold (L, F), W_dec_{l})."""
    cfg = module.config
    sites = [site_hooks(a, b, family) for a, b in zip(cfg.hookpoints_in(), cfg.hookpoints_out())]
    layers = [s[0] for s in sites]
    if layers != list(range(layers[0], layers[0] + len(layers))) or len({s[1:] for s in sites}) != 1:
        raise CircuitTracerFormatError(f"circuit-tracer's CLT spans consecutive layers with one pair of hooks; "
                                       f"{cfg.hookpoint_in!r} -> {cfg.hookpoint_out!r} does not")
    thresholds = module.thresholds()
    _check_codes_and_widths("CLT", thresholds is None, cfg.d_in, cfg.d_out)
    W_enc = np.asarray(module.W_enc[...], np.float64)  # (L, d, F)
    b_enc = np.asarray(module.b_enc[...], np.float64) - np.einsum("ld,ldf->lf", np.asarray(module.b_in[...], np.float64), W_enc)
    arrays = {"W_enc": _f32(np.swapaxes(W_enc, 1, 2)), "b_enc": _f32(b_enc), "b_dec": _f32(module.b_dec[...]),
              "threshold": _f32(thresholds)}
    for i in range(len(layers)):
        arrays[f"W_dec_{i}"] = _f32(module.decoder(i)[...])
    return layers, sites[0][1], sites[0][2], arrays


def write_clt(module: Any, folder: str | Path, n_layers: int = 0, family: Family | None = None,
              scan: str | None = None, metadata: dict[str, Any] | None = None, source: str = "") -> dict[str, Any]:
    """Write a dictlearn CLT in circuit-tracer's CLT layout in `folder` (other files there are left alone).

    n_layers: layers it covers (0: up to its last layer); layers outside its range get encoders and decoders of
    zeros (latents that never fire). Returns a summary (files, layers, hooks), also kept in config.yaml."""
    layers, hook_in, hook_out, a = clt_layers(module, family)
    first, top = layers[0], layers[-1] + 1
    n_layers = n_layers or top
    if n_layers < top:
        raise CircuitTracerFormatError(f"n_layers = {n_layers} leaves out layer {top - 1}, which the clt covers")
    n_feat, d = a["W_enc"].shape[1:]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_layers):
        l = i - first  # noqa: E741  (the CLT's own layer index)
        real = 0 <= l < len(layers)
        enc = {f"W_enc_{i}": a["W_enc"][l] if real else np.zeros((n_feat, d), np.float32),
               f"b_enc_{i}": a["b_enc"][l] if real else np.zeros(n_feat, np.float32),
               f"b_dec_{i}": a["b_dec"][l] if real else np.zeros(d, np.float32),
               f"threshold_{i}": a["threshold"][l] if real else np.zeros(n_feat, np.float32)}
        dec = np.zeros((n_feat, n_layers - i, d), np.float32)
        if real:
            dec[:, : top - i] = a[f"W_dec_{l}"]  # its writes to layers i..top-1; later layers stay zero
        atomic_save_safetensors(folder / f"W_enc_{i}.safetensors", {k: _f32(v) for k, v in enc.items()})
        atomic_save_safetensors(folder / f"W_dec_{i}.safetensors", {f"W_dec_{i}": dec})
        files += [f"W_enc_{i}.safetensors", f"W_dec_{i}.safetensors"]
    _remove_stale(folder, "W_enc_*.safetensors", set(files))
    _remove_stale(folder, "W_dec_*.safetensors", set(files))
    sources = {layer: source or module.kind for layer in layers}
    config = _config("cross_layer_transcoder", hook_in, hook_out, scan or folder.name, n_layers, sources, metadata)
    atomic_write_text(folder / CONFIG_FILE, to_yaml(config))
    return {"files": [*files, CONFIG_FILE], **config}
