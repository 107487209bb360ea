"""Export dictionaries for the tools people already use, and import theirs.

One exported folder per decomposer (`<out_dir>/export/<name>/`):
- the kind's own format, chosen by its `export_format` (WRITERS below): "linear" kinds (every SparseCoder)
  write SAELens's `cfg.json` + `sae_weights.safetensors` where SAELens has the architecture (`saelens.py`);
  "snmf" writes `snmf.safetensors` + `snmf.json` (`snmf_format.py`); "clt" writes circuit-tracer's
  cross-layer transcoder layout (`circuit_tracer.py`);
- `features.safetensors` + `features.json`: one steering vector per feature at the hookpoint it is added to
  (`features.py`), what `dictlearn steer` reads;
- `export.json`: what was written, why a format was skipped, and the model (the user's name for it and its
  weights' fingerprint, so an export made here is usable on another machine).
Per-layer transcoders also go, together, into circuit-tracer transcoder-set folders: that is a run-level
step (`circuit_tracer.plan_transcoder_sets` / `write_transcoder_set`, called by the export stage).

Import: `saelens.import_saelens(folder)` and `sparsify.import_sparsify(folder)` give dictlearn decomposers
that compute what the foreign folder computes; `base.save` them so `dictlearn eval` can score them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dictlearn.export.features import write_features
from dictlearn.files import atomic_write_json

EXPORT_FILE = "export.json"


@dataclass
class ExportConfig:
    """The `[export]` table of a run config."""

    decomposers: list[str] = field(default_factory=list)  # names to export (empty: every saved decomposer)
    saelens: bool = True  # write the SAELens folder where SAELens has the architecture
    features: bool = True  # write features.safetensors (steering vectors)
    circuit_tracer: bool = True  # write circuit-tracer's formats: CLTs, and per-layer transcoders as sets
    circuit_tracer_layers: int = 0  # layers a circuit-tracer set/CLT covers (0: up to its last layer; graphs need all)


@dataclass
class ModelRef:
    """The model an export belongs to: the user's name for it (a hub id or a path as given) and the
    fingerprint of its weights; `load` gives the model itself when a writer needs it (None: unavailable)."""

    name: str | None = None
    fingerprint: str | None = None
    load: Callable[[], Any] | None = None

    def model(self) -> Any:
        return self.load() if self.load is not None else None


Written = tuple[list[str], dict[str, str], tuple[str, np.ndarray] | None]  # files, skipped {format: why}, features


def _write_linear(module: Any, folder: Path, cfg: ExportConfig, ref: ModelRef, metadata: dict[str, Any]) -> Written:
    """SAELens's folder where SAELens has the architecture (else skipped, saying why)."""
    from dictlearn.export.kinds import UnsupportedKindError
    from dictlearn.export.saelens import SaeLensFormatError, export_saelens

    if not cfg.saelens:
        return [], {}, None
    try:
        export_saelens(module, folder, metadata={"model_name": ref.name, "model_fingerprint": ref.fingerprint,
                                                 "dictlearn_kind": module.kind, **metadata})
    except (SaeLensFormatError, UnsupportedKindError) as e:
        return [], {"saelens": str(e)}, None
    return ["cfg.json", "sae_weights.safetensors"], {}, None


def _write_snmf(module: Any, folder: Path, cfg: ExportConfig, ref: ModelRef, metadata: dict[str, Any]) -> Written:
    """Semi-NMF's own files; its steering vectors are its residual-stream directions (stored, else computed
    from the model's MLP output projection)."""
    from dictlearn.export.snmf_format import SnmfFormatError, steering_directions, write_snmf

    model = features = None
    if cfg.features:
        try:
            features = steering_directions(module)
        except SnmfFormatError:  # no stored directions: the model's MLP output projection gives them
            model = ref.model()
            features = steering_directions(module, model)
    write_snmf(module, folder, model=model, model_name=ref.name)
    return ["snmf.safetensors", "snmf.json"], {}, features


def _write_clt(module: Any, folder: Path, cfg: ExportConfig, ref: ModelRef, metadata: dict[str, Any]) -> Written:
    """circuit-tracer's CLT layout in the export folder itself (config.yaml, W_enc_*/W_dec_*.safetensors). A
    CLT latent writes to several layers, so it has no single steering vector: no features file."""
    from dictlearn.export.circuit_tracer import CircuitTracerFormatError, write_clt

    skipped = {"features": "a cross-layer transcoder's latent writes to several layers; it has no single "
                           "steering vector at one hookpoint"}
    if not cfg.circuit_tracer:
        return [], skipped, None
    try:
        summary = write_clt(module, folder, cfg.circuit_tracer_layers, scan=metadata.get("dictlearn_name"),
                            metadata={"model_name": ref.name, "model_fingerprint": ref.fingerprint, **metadata},
                            source=metadata.get("dictlearn_name", ""))
    except CircuitTracerFormatError as e:
        return [], {**skipped, "circuit_tracer": str(e)}, None
    return summary["files"], skipped, None


WRITERS: dict[str, Callable[..., Written]] = {"linear": _write_linear, "snmf": _write_snmf,
                                              "clt": _write_clt}  # by export_format


def export_decomposer(module: Any, folder: str | Path, model_name: str | None = None, model: Any = None,
                      cfg: ExportConfig | None = None, metadata: dict[str, Any] | None = None,
                      model_fingerprint: str | None = None, load_model: Callable[[], Any] | None = None
                      ) -> dict[str, Any]:
    """Write every format `module` has into `folder`; returns (and writes as export.json) a summary.

    model_name: the user's name for the model (recorded as given); model / load_model: the model itself
    (or how to load it), only for writers that need it."""
    cfg = cfg or ExportConfig()
    ref = ModelRef(model_name, model_fingerprint, (lambda: model) if model is not None else load_model)
    metadata = dict(metadata or {})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fmt = getattr(module, "export_format", "")
    writer = WRITERS.get(fmt)
    files, skipped, features = writer(module, folder, cfg, ref, metadata) if writer else ([], {}, None)
    if writer is None:
        skipped[fmt or "native"] = f"no export writer for format {fmt!r} (kind {module.kind!r})"
    if cfg.features and "features" not in skipped:
        hookpoint, vectors = features or (module.config.hookpoint_out, np.asarray(module.features(), np.float32))
        write_features(folder, vectors, hookpoint, model=ref.name, model_fingerprint=ref.fingerprint,
                       source={"kind": module.kind, "hookpoint_in": module.config.hookpoint_in,
                               "hookpoint_out": module.config.hookpoint_out, **metadata})
        files += ["features.safetensors", "features.json"]
    summary = {"kind": module.kind, "model": ref.name, "model_fingerprint": ref.fingerprint, "files": files,
               "skipped": skipped, "options": {"saelens": cfg.saelens, "features": cfg.features,
                                                         "circuit_tracer": cfg.circuit_tracer}}
    atomic_write_json(folder / EXPORT_FILE, summary, indent=2)
    return summary
