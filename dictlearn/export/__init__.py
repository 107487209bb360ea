"""Export dictionaries for the tools people already use, and import theirs.

One exported folder per decomposer (`<out_dir>/export/<name>/`):
- `cfg.json` + `sae_weights.safetensors`: SAELens's format (SAEs and ReLU/JumpReLU transcoders; `saelens.py`);
- `snmf.safetensors` + `snmf.json`: semi-NMF's factors and encoder settings (`snmf_format.py`);
- `features.safetensors` + `features.json`: one steering vector per feature at the hookpoint it is added to
  (`features.py`), what `dictlearn steer` reads;
- `export.json`: what was written, why a format was skipped, and the fingerprint of the source folder.

Import: `saelens.import_saelens(folder)` and `sparsify.import_sparsify(folder)` give dictlearn decomposers
that compute what the foreign folder computes; `base.save` them so `dictlearn eval` can score them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dictlearn.export.features import write_features

EXPORT_FILE = "export.json"


@dataclass
class ExportConfig:
    """The `[export]` table of a run config."""

    decomposers: list[str] = field(default_factory=list)  # names to export (empty: every saved decomposer)
    saelens: bool = True  # write the SAELens folder where SAELens has the architecture
    features: bool = True  # write features.safetensors (steering vectors)


def steering_vectors(module: Any, model: Any = None) -> tuple[str, np.ndarray]:
    """(hookpoint, (n_features, width) float32) for steering: where a feature writes and its direction there.

    SAEs and transcoders: `features()` (decoder rows) at `hookpoint_out`. Semi-NMF: its residual-stream
    directions F^T W_out at mlp_out.L (stored by the trainer, else computed from `model`'s MLP weights)."""
    if module.kind == "snmf":
        from dictlearn.export.snmf_format import steering_directions

        return steering_directions(module, model)
    return module.config.hookpoint_out, np.asarray(module.features(), dtype=np.float32)


def load_kinds() -> None:
    """Import every module of dictlearn.decomposers so each kind is registered before `base.load`."""
    import importlib
    import pkgutil

    import dictlearn.decomposers as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def source_fingerprint(folder: str | Path) -> str:
    """sha256 of a native decomposer folder's config.json and params.safetensors."""
    from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE

    h = hashlib.sha256()
    for name in (CONFIG_FILE, PARAMS_FILE):
        with open(Path(folder) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def is_exported(folder: str | Path, fingerprint: str, cfg: ExportConfig) -> bool:
    """True when `folder` holds a finished export of the same source with the same options."""
    path = Path(folder) / EXPORT_FILE
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if done.get("source_fingerprint") != fingerprint or done.get("options") != {"saelens": cfg.saelens, "features": cfg.features}:
        return False
    return all((Path(folder) / f).is_file() for f in done.get("files", []))


def export_decomposer(module: Any, folder: str | Path, model_name: str | None = None, model: Any = None,
                      cfg: ExportConfig | None = None, fingerprint: str = "", metadata: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Write every format `module` has into `folder`; returns (and writes as export.json) a summary."""
    from dictlearn.export.kinds import UnsupportedKindError
    from dictlearn.export.saelens import SaeLensFormatError, export_saelens

    cfg = cfg or ExportConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"kind": module.kind, "model": model_name, "files": [], "skipped": {},
                               "source_fingerprint": fingerprint,
                               "options": {"saelens": cfg.saelens, "features": cfg.features}}
    if module.kind == "snmf":
        from dictlearn.export.snmf_format import write_snmf

        write_snmf(module, folder, model=model, model_name=model_name)
        summary["files"] += ["snmf.safetensors", "snmf.json"]
    elif cfg.saelens:
        try:
            export_saelens(module, folder, metadata={"model_name": model_name, "dictlearn_kind": module.kind, **(metadata or {})})
            summary["files"] += ["cfg.json", "sae_weights.safetensors"]
        except (SaeLensFormatError, UnsupportedKindError) as e:
            summary["skipped"]["saelens"] = str(e)
    if cfg.features:
        hookpoint, vectors = steering_vectors(module, model)
        write_features(folder, vectors, hookpoint, model=model_name,
                       source={"kind": module.kind, "hookpoint_in": module.config.hookpoint_in,
                               "hookpoint_out": module.config.hookpoint_out, **(metadata or {})})
        summary["files"] += ["features.safetensors", "features.json"]
    tmp = folder / (EXPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(folder / EXPORT_FILE)
    return summary
