"""`dictlearn export CONFIG.toml [--set key=value]... [--only NAME]... [--force]`
`dictlearn export --import-saelens DIR --out DIR [--hookpoint H] [--hookpoint-out H]`
`dictlearn export --import-sparsify DIR --out DIR [--hookpoint-prefix model.] [--hookpoint H] [--hookpoint-out H]`

Export: every decomposer saved under `<out_dir>/decomposers/<name>/` is written to `<out_dir>/export/<name>/`
as a SAELens folder (where SAELens has the architecture), semi-NMF's own files, circuit-tracer's CLT layout
(cross-layer transcoders) and `features.safetensors` (steering vectors for `dictlearn steer`); per-layer
transcoders are also collected into circuit-tracer transcoder sets, `<out_dir>/export/circuit-tracer-<in>-<out>-
<width>[-skip]/`. Options come from the config's `[export]` table (dictlearn.export.ExportConfig). A folder
already exported from the same weights is skipped unless --force.

Import: a SAELens folder, or a sparsify folder (one dictionary, or one subfolder per hookpoint), becomes a
dictlearn native folder (config.json + params.safetensors) at --out, which `dictlearn eval` scores when it
sits under `<out_dir>/decomposers/`.
"""

from __future__ import annotations

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


def export_stage(run, only: list[str] | None = None, force: bool = False, log=print) -> dict[str, Path]:
    """The export stage of `run`: every saved decomposer (or `only`) not exported since its files or the
    options last changed (the run's up-to-date rule). Returns name -> export folder of what was written."""
    from dictlearn.cli.evaluate import load_saved
    from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE
    from dictlearn.export import EXPORT_FILE, ExportConfig, export_decomposer
    from dictlearn.run import mark_done, up_to_date

    cfg = run.section(ExportConfig, "export")
    names = run.pick_saved(list(only or cfg.decomposers), "export")
    model_name, fingerprint = run.model_reference()
    options = {**run.stage_options(cfg, drop=("decomposers",)), "model": model_name, "model_fingerprint": fingerprint}
    written = {}
    for name in names:
        folder, dest = run.decomposer_dir(name), run.export_dir(name)
        inputs = {"config": folder / CONFIG_FILE, "params": folder / PARAMS_FILE}
        if not force and up_to_date(dest, inputs, options):
            log(f"export: {name}: up to date in {dest} (--force exports again)")
            continue
        module = load_saved(run, [name])[name]
        summary = export_decomposer(module, dest, model_name=model_name, model_fingerprint=fingerprint,
                                    load_model=lambda: run.model(), cfg=cfg, metadata={"dictlearn_name": name})
        mark_done(dest, inputs, options, [*summary["files"], EXPORT_FILE])
        skipped = "".join(f"; skipped {fmt}: {why}" for fmt, why in summary["skipped"].items())
        log(f"export: {name} ({module.kind}) -> {dest}: {', '.join(summary['files'])}{skipped}")
        written[name] = dest
    if cfg.circuit_tracer:
        written.update(circuit_tracer_stage(run, names, cfg.circuit_tracer_layers, options, force, log))
    return written


def circuit_tracer_stage(run, names: list[str], n_layers: int, options: dict, force: bool = False, log=print
                         ) -> dict[str, Path]:
    """The run's per-layer transcoders, grouped into circuit-tracer transcoder sets (one per hooks, width and
    skip path), each written to `<out_dir>/export/<set name>/` unless up to date. Returns set name -> folder."""
    import json

    from dictlearn.cli.evaluate import load_saved
    from dictlearn.decomposers.base import CONFIG_FILE, PARAMS_FILE, REGISTRY
    from dictlearn.export.circuit_tracer import plan_transcoder_sets, write_transcoder_set
    from dictlearn.run import mark_done, up_to_date

    def per_layer_transcoder(name: str) -> bool:  # from config.json alone: only these are loaded
        cls = REGISTRY.get(json.loads((run.decomposer_dir(name) / CONFIG_FILE).read_text()).get("kind"))
        return bool(getattr(cls, "transcoder", False)) and not getattr(cls, "site_axis", False)

    modules = load_saved(run, [n for n in names if per_layer_transcoder(n)])
    plans, skipped = plan_transcoder_sets(modules)
    for what, why in skipped.items():
        log(f"export: circuit-tracer: left out {what}: {why}")
    written = {}
    for plan in plans:
        dest = run.export_dir(plan.name)
        members = {n: modules[n] for n in plan.members.values()}
        inputs = {f"{n}.{key}": run.decomposer_dir(n) / f for n in members
                  for key, f in (("config", CONFIG_FILE), ("params", PARAMS_FILE))}
        if not force and up_to_date(dest, inputs, options):
            log(f"export: {plan.name}: up to date in {dest} (--force exports again)")
            continue
        model_name, fingerprint = options.get("model"), options.get("model_fingerprint")
        summary = write_transcoder_set(members, dest, n_layers, metadata={"model_name": model_name,
                                                                          "model_fingerprint": fingerprint})
        mark_done(dest, inputs, options, summary["files"])
        padded = summary["dictlearn_padded_layers"]
        log(f"export: {plan.name} (circuit-tracer transcoder set, layers "
            f"{', '.join(f'{k}: {v}' for k, v in summary['dictlearn_layers'].items())}"
            f"{f'; {len(padded)} never-firing padding layer(s)' if padded else ''}) -> {dest}")
        written[plan.name] = dest
    return written


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


ERRORS = ("dictlearn.cli.export:ExportError", "dictlearn.config:ConfigError",
          "dictlearn.export.saelens:SaeLensFormatError", "dictlearn.export.sparsify:SparsifyFormatError",
          "dictlearn.export.snmf_format:SnmfFormatError", "dictlearn.export.features:FeaturesError",
          "dictlearn.export.circuit_tracer:CircuitTracerFormatError",
          "dictlearn.activations.cache:CacheError", "dictlearn.activations.families:HookpointError", "builtins:FileNotFoundError")


def main(argv: list[str]) -> int:
    from dictlearn.cli.common import report_errors
    from dictlearn.run import Run

    args = tyro.cli(ExportArgs, args=argv, prog="dictlearn export")

    def work() -> None:
        if args.import_saelens or args.import_sparsify:
            if args.config is not None:
                raise ExportError("an import takes no CONFIG; give --import-... DIR --out DIR")
            import_run(args)
            return
        if args.config is None:
            raise ExportError("give a run config (dictlearn export CONFIG.toml) or an import "
                              "(--import-saelens DIR / --import-sparsify DIR with --out DIR)")
        export_stage(Run.from_config(args.config, args.set), args.only, args.force)

    return report_errors("dictlearn export", ERRORS, work)
