"""`dictlearn export CONFIG.toml [--set key=value]... [--only NAME]... [--force]`
`dictlearn export --import-saelens DIR --out DIR [--hookpoint H] [--hookpoint-out H]`
`dictlearn export --import-sparsify DIR --out DIR [--hookpoint-prefix model.] [--hookpoint H] [--hookpoint-out H]`

Export: every decomposer saved under `<out_dir>/decomposers/<name>/` is written to `<out_dir>/export/<name>/`
as a SAELens folder (where SAELens has the architecture), semi-NMF's own files, and `features.safetensors`
(steering vectors for `dictlearn steer`). Options come from the config's `[export]` table
(dictlearn.export.ExportConfig). A folder already exported from the same weights is skipped unless --force.

Import: a SAELens folder, or a sparsify folder (one dictionary, or one subfolder per hookpoint), becomes a
dictlearn native folder (config.json + params.safetensors) at --out, which `dictlearn eval` scores when it
sits under `<out_dir>/decomposers/`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro


@dataclass
class ExportArgs:
    config: Annotated[Path | None, tyro.conf.Positional] = None
    """the run config (TOML); not needed with --import-saelens / --import-sparsify"""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """config override key.path=value (repeatable), e.g. --set export.saelens=false"""
    only: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """export only the decomposer with this name (repeatable; overrides export.decomposers)"""
    force: bool = False
    """export again even where the export is up to date"""
    import_saelens: Path | None = None
    """a SAELens folder (cfg.json + sae_weights.safetensors) to convert to dictlearn's native format"""
    import_sparsify: Path | None = None
    """a sparsify folder (cfg.json + sae.safetensors, or one subfolder per hookpoint) to convert"""
    out: Path | None = None
    """where an import writes (a sparsify run with several hookpoints: one subfolder per hookpoint)"""
    hookpoint: str | None = None
    """import: the hookpoint the dictionary reads, when the folder does not say (e.g. resid_post.10)"""
    hookpoint_out: str | None = None
    """import: the hookpoint a transcoder writes, when the folder does not say"""
    hookpoint_prefix: str = "model."
    """sparsify import: module-path prefix of the model's base (sparsify names hookpoints like layers.10.mlp)"""


class ExportError(ValueError):
    """Bad arguments or inputs for `dictlearn export`."""


def _model_reference(data: dict, root: Path) -> tuple[str | None, dict]:
    """The model name to record (an absolute path for local files) and the [model] table."""
    table = data.get("model") or {}
    name = table.get("name")
    if name is None:
        from dictlearn.activations.cache import ActivationCache, CacheError

        try:
            name = ActivationCache.open(root / "cache").model_name
        except (CacheError, FileNotFoundError, KeyError):  # no cache: the features simply name no model
            name = None
    if name and Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    return name, table


def export_run(args: ExportArgs) -> int:
    from dictlearn.cli.common import out_dir, read_run_config
    from dictlearn.config import from_dict
    from dictlearn.decomposers import base
    from dictlearn.export import ExportConfig, export_decomposer, is_exported, load_kinds, source_fingerprint

    data = read_run_config(args.config, args.set)
    cfg = from_dict(ExportConfig, data.get("export", {}), where=f"{args.config} [export]")
    root = out_dir(data, args.config)
    src = root / "decomposers"
    names = list(args.only or cfg.decomposers)
    saved = sorted(p.name for p in src.iterdir() if (p / base.CONFIG_FILE).is_file() and (p / base.PARAMS_FILE).is_file()) if src.is_dir() else []
    if not saved:
        raise ExportError(f"no saved decomposers under {src}; run `dictlearn train {args.config}` first")
    missing = [n for n in names if n not in saved]
    if missing:
        raise ExportError(f"no saved decomposer named {', '.join(missing)} under {src}; saved: {', '.join(saved)}")
    model_name, model_table = _model_reference(data, root)
    load_kinds()
    model = None
    for name in names or saved:
        folder, dest = src / name, root / "export" / name
        fingerprint = source_fingerprint(folder)
        if not args.force and is_exported(dest, fingerprint, cfg):
            print(f"export: {name}: up to date in {dest} (--force exports again)")
            continue
        module = base.load(folder)
        if module.kind == "snmf" and module.config.d_model == 0 and model is None and model_table:
            from dictlearn.activations.models import ModelConfig

            model = from_dict(ModelConfig, model_table, where=f"{args.config} [model]").load()
        summary = export_decomposer(module, dest, model_name=model_name, model=model, cfg=cfg,
                                    fingerprint=fingerprint, metadata={"dictlearn_name": name})
        skipped = "".join(f"; skipped {fmt}: {why}" for fmt, why in summary["skipped"].items())
        print(f"export: {name} ({module.kind}) -> {dest}: {', '.join(summary['files'])}{skipped}")
    return 0


def import_run(args: ExportArgs) -> int:
    from dictlearn.decomposers import base

    if args.import_saelens and args.import_sparsify:
        raise ExportError("give one of --import-saelens and --import-sparsify, not both")
    if args.out is None:
        raise ExportError("an import needs --out DIR (the native folder to write)")
    if args.import_saelens:
        from dictlearn.export.saelens import import_saelens

        module = import_saelens(args.import_saelens, args.hookpoint, args.hookpoint_out)
        base.save(module, args.out, extra={"imported_from": str(Path(args.import_saelens).resolve()), "format": "saelens"})
        print(f"export: imported SAELens folder {args.import_saelens} as {module.kind} "
              f"({module.config.hookpoint_in} -> {module.config.hookpoint_out}, {module.config.n_features} features) into {args.out}")
        return 0
    from dictlearn.export.sparsify import import_sparsify, is_sparsify_folder

    found = import_sparsify(args.import_sparsify, args.hookpoint_prefix, args.hookpoint, args.hookpoint_out)
    single = is_sparsify_folder(args.import_sparsify)
    for name, module in found.items():
        dest = Path(args.out) if single else Path(args.out) / name
        base.save(module, dest, extra={"imported_from": str((Path(args.import_sparsify) / ("" if single else name)).resolve()),
                                       "format": "sparsify"})
        print(f"export: imported sparsify {name} as {module.kind} ({module.config.hookpoint_in} -> "
              f"{module.config.hookpoint_out}, {module.config.n_features} features) into {dest}")
    return 0


def main(argv: list[str]) -> int:
    args = tyro.cli(ExportArgs, args=argv, prog="dictlearn export")
    from dictlearn.config import ConfigError
    from dictlearn.export.features import FeaturesError
    from dictlearn.export.saelens import SaeLensFormatError
    from dictlearn.export.sparsify import SparsifyFormatError

    try:
        if args.import_saelens or args.import_sparsify:
            if args.config is not None:
                raise ExportError("an import takes no CONFIG; give --import-... DIR --out DIR")
            return import_run(args)
        if args.config is None:
            raise ExportError("give a run config (dictlearn export CONFIG.toml) or an import "
                              "(--import-saelens DIR / --import-sparsify DIR with --out DIR)")
        return export_run(args)
    except (ExportError, ConfigError, SaeLensFormatError, SparsifyFormatError, FeaturesError, FileNotFoundError) as e:
        print(f"dictlearn export: {e}", file=sys.stderr)
        return 1
