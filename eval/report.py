"""The comparison report: metrics.json, report.md and PNG plots from the suite's records.

metrics.json = {"meta": {...}, "decomposers": [record, ...]} with the same keys in every record (None where a
metric was not computed), so decomposers of any kind compare side by side. Plots (matplotlib, Agg):
  plots/fvu_vs_l0.png         FVU against L0, one colour per kind, the Pareto front of each kind drawn as a line
  plots/ce_score_vs_l0.png    CE-loss score against L0 (when the downstream loss was computed)
  plots/freq_hist.png         firing-frequency histograms (log10 frequency; dead latents in the legend)
  plots/steering_curves.png   concept, fluency and combined score against the KL target (when steering ran)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dictlearn.files import atomic_write_bytes, atomic_write_text

COLUMNS = [  # (record key, header, format)
    ("name", "decomposer", "{}"), ("kind", "kind", "{}"), ("hookpoint_out", "writes", "{}"),
    ("n_features", "features", "{:,}"), ("l0", "L0", "{:.1f}"), ("fvu", "FVU", "{:.4f}"),
    ("explained_variance", "expl. var", "{:.3f}"), ("cossim", "cos", "{:.3f}"), ("l2_ratio", "L2 ratio", "{:.3f}"),
    ("relative_reconstruction_bias", "rel. bias", "{:.3f}"), ("dead_fraction", "dead", "{:.3f}"),
    ("dense_fraction", "dense", "{:.3f}"), ("ce_clean", "CE clean", "{:.3f}"), ("ce_spliced", "CE spliced", "{:.3f}"),
    ("ce_ablated", "CE ablated", "{:.3f}"), ("ce_loss_score", "CE score", "{:.3f}"), ("kl_score", "KL score", "{:.3f}"),
]
STEERING_COLUMNS = [  # keys of a steering record's "summary"
    ("detection_auc", "detection AUC", "{:.3f}"), ("concept_rate", "concept rate", "{:.3f}"),
    ("gain_over_random", "gain vs random", "{:+.3f}"), ("p_value", "p", "{:.3g}"), ("fluency", "fluency", "{:.3f}"),
    ("combined", "combined", "{:.3f}"), ("feature_concept", "feature concept", "{:.3f}"),
    ("feature_fluency", "feature fluency", "{:.3f}"), ("feature_combined", "feature combined", "{:.3f}"),
]


def json_safe(x: Any) -> Any:
    """Plain JSON: NaN and infinities become None (null), numpy scalars and arrays become Python values."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy scalar or array
        return json_safe(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def check_same_keys(records: list[dict[str, Any]]) -> None:
    """Every record must have the same keys: a comparison table with holes in it is a bug upstream."""
    if not records:
        return
    keys = set(records[0])
    for r in records[1:]:
        if set(r) != keys:
            raise ValueError(f"record {r.get('name')!r} has keys differing from {records[0].get('name')!r}: "
                             f"{sorted(set(r) ^ keys)}")


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], steering: dict[str, Any] | None = None,
             plots: list[str] = ()) -> str:
    """report.md: the comparison table, the steering table when present, and the plots."""
    parts = [
        "# Evaluation report", "",
        f"Model `{meta.get('model')}`, cache `{meta.get('cache')}`. Reconstruction and sparsity on "
        f"{_fmt(records[0].get('n_tokens') if records else None, '{:,}')} held-out tokens; downstream loss on "
        f"{_fmt(records[0].get('n_downstream_tokens') if records else None, '{:,}')} next-token predictions "
        f"(CE in nats; score = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)). "
        f"Evaluation took {_fmt(meta.get('seconds'), '{:.0f}')} s.", "",
        _table([h for _, h, _ in COLUMNS], [[_fmt(r.get(k), f) for k, _, f in COLUMNS] for r in records]),
    ] + per_site_section(records)
    if steering:
        rows = []
        for name, rec in steering.get("records", {}).items():
            s = rec.get("summary") or {}
            rows.append([name, str(rec.get("kind")), str(rec.get("hookpoint"))] + [_fmt(s.get(k), f) for k, _, f in STEERING_COLUMNS])
        kl = next((rec.get("summary", {}).get("kl_target") for rec in steering.get("records", {}).values() if rec.get("summary")), None)
        if rows:
            parts += ["", f"## Steering (at KL {_fmt(kl, '{:g}')}, sign +1)", "",
                      _table(["vector", "kind", "hookpoint"] + [h for _, h, _ in STEERING_COLUMNS], rows)]
        elif steering.get("skipped"):
            parts += ["", "## Steering"]
        for name, why in (steering.get("skipped") or {}).items():
            parts += ["", f"{name} is not steered: {why}"]
        judges = steering.get("judges")
        if judges:
            parts += ["", "Judges: held-out accuracy " + ", ".join(f"{k} {_fmt(v, '{:.3f}')}" for k, v in
                                                                   (judges.get("heldout_accuracy") or {}).items())]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def per_site_section(records: list[dict[str, Any]]) -> list[str]:
    """Report lines for the decomposers over several sites (cross-layer transcoders): FVU, L0 and dead fraction
    of each layer; nothing when every decomposer has one site (its per-site figures are its overall ones)."""
    rows = []
    for r in records:
        if (r.get("n_sites") or 1) < 2:
            continue
        fvu, l0, dead = (r.get(f"{k}_per_site") or {} for k in ("fvu", "l0", "dead_fraction"))
        for (hp_in, l0_v), (hp_out, fvu_v), dead_v in zip(l0.items(), fvu.items(), dead.values()):
            rows.append([str(r["name"]), hp_in, hp_out, _fmt(fvu_v, "{:.4f}"), _fmt(l0_v, "{:.1f}"), _fmt(dead_v, "{:.3f}")])
    if not rows:
        return []
    return ["", "## Per layer", "",
            "Decomposers over several sites, one row per layer: FVU of the output site it reconstructs; L0 and dead "
            "fraction of the latents its encoder reads at the input site (the table above pools every layer).", "",
            _table(["decomposer", "reads", "writes", "FVU", "L0", "dead"], rows)]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (l0, fvu) not beaten by another with both lower-or-equal L0 and FVU, sorted by L0."""
    front, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _save_png(fig: Any, path: Path, dpi: int) -> None:
    """A figure as PNG, written atomically (a reader never sees half a plot)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def plot_all(records: list[dict[str, Any]], folder: Path, steering: dict[str, Any] | None = None) -> list[str]:
    """Write the PNG plots under folder; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    kinds = sorted({r["kind"] for r in records})
    colour = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}

    def scatter(key: str, ylabel: str, fname: str, front: bool) -> None:
        pts = [r for r in records if _finite(r.get("l0"), r.get(key))]
        if not pts:
            return
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for k in kinds:
            mine = [r for r in pts if r["kind"] == k]
            if not mine:
                continue
            ax.scatter([r["l0"] for r in mine], [r[key] for r in mine], color=colour[k], label=k, zorder=3)
            for r in mine:
                ax.annotate(r["name"], (r["l0"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if front:
                f = pareto_front([(r["l0"], r[key]) for r in mine])
                ax.plot([p[0] for p in f], [p[1] for p in f], color=colour[k], alpha=0.6)
        ax.set_xlabel("L0 (active features per token)")
        ax.set_ylabel(ylabel)
        if max(r["l0"] for r in pts) > 10 * max(min(r["l0"] for r in pts), 1e-9):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_png(fig, folder / fname, dpi=110)
        plt.close(fig)
        written.append(fname)

    scatter("fvu", "FVU (fraction of variance unexplained)", "fvu_vs_l0.png", front=True)
    scatter("ce_loss_score", "CE-loss score", "ce_score_vs_l0.png", front=False)

    hists = [r for r in records if r.get("freq_hist")]
    if hists:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in hists:
            h = r["freq_hist"]
            edges = h["log10_edges"]
            total = max(r.get("n_features") or sum(h["counts"]) + h["dead"], 1)
            ax.stairs([c / total for c in h["counts"]], edges, label=f"{r['name']} (dead {h['dead'] / total:.1%})")
        ax.set_xlabel("log10 firing frequency")
        ax.set_ylabel("fraction of features")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_png(fig, folder / "freq_hist.png", dpi=110)
        plt.close(fig)
        written.append("freq_hist.png")

    if steering and steering.get("records"):
        panels = [("concept", "concept_curve", "concept_rate"), ("fluency", "concept_curve", "fluency"),
                  ("combined", "concept_curve", "combined"), ("feature concept", "feature_curve", "concept"),
                  ("feature fluency", "feature_curve", "fluency"), ("feature combined", "feature_curve", "combined")]
        fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
        drawn = False
        for ax, (title, curve, key) in zip(axes.flat, panels):
            for name, rec in steering["records"].items():
                pts = sorted((p["kl_target"], p.get(key)) for p in rec.get(curve) or []
                             if p.get("sign", 1) == 1 and _finite(p.get("kl_target"), p.get(key)))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                            linestyle="--" if rec.get("kind") in ("diffmean", "random") else "-")
                    drawn = True
            ax.set_title(title)
            ax.set_xlabel("KL target (nats)")
            ax.set_xscale("log")
            targets = sorted({p["kl_target"] for rec in steering["records"].values()
                              for p in (rec.get("concept_curve") or []) + (rec.get("feature_curve") or [])
                              if _finite(p.get("kl_target"))})
            if targets:
                ax.set_xticks(targets, [f"{t:g}" for t in targets])
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3)
        handles, labels = [], []
        for ax in axes.flat:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labels:
                    handles.append(h)
                    labels.append(l)
        if drawn:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
            fig.tight_layout(rect=(0, 0.07, 1, 1))
            _save_png(fig, folder / "steering_curves.png", dpi=100)
            written.append("steering_curves.png")
        plt.close(fig)
    return written


def write_report(out: Path, meta: dict[str, Any], records: list[dict[str, Any]],
                 steering: dict[str, Any] | None = None, sections: dict[str, Any] | None = None) -> None:
    """metrics.json, report.md and plots/ under out.

    sections: the other stages' results, each optional: {"probing": .., "absorption": .., "matching": ..,
    "ood": {label: {"corpus", "n_tokens", "records"}}} (a section absent or None is left out of the report)."""
    sections = json_safe(sections) if sections else {}
    records = json_safe(records)
    steering = json_safe(steering) if steering else None
    check_same_keys(records)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(json_safe({"meta": meta, "decomposers": records}), indent=1,
                                                       allow_nan=False))
    plots = plot_all(records, out / "plots", steering)
    atomic_write_text(out / "report.md", markdown(meta, records, steering, [f"plots/{p}" for p in plots]))
