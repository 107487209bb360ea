"""The comparison report: metrics.json, report.md and PNG plots from the suite's records.

metrics.json = {"meta": {...}, "decomposers": [record, ...]} with the same keys in every record (None where a
metric was not computed), so decomposers of any kind compare side by side. report.md has one table per group of
record keys (RECORD_TABLES), then each other stage's section when given (steering, probing and absorption, feature
matching, out of distribution). Plots (matplotlib, Agg):
  plots/fvu_vs_l0.png         FVU against L0, one panel per space written, one colour per kind, each kind's Pareto
                              front as a line; a red ring marks an L0 more than 20 % off the config's own target
  plots/ce_score_vs_l0.png    CE-loss score against L0 (when the downstream loss was computed)
  plots/downstream.png        the CE loss each dictionary adds when spliced in, in nats per token
  plots/freq_hist.png         firing-frequency histograms (log10 frequency; dead latents in the legend)
  plots/steering_curves.png   concept, fluency and combined score against the KL target (bars at a single target)
  plots/matching.png          the feature-matching stage's plot (dictlearn.eval.matching.plot_matching)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dictlearn.files import atomic_write_bytes, atomic_write_text

OFF_TARGET = 0.2  # an L0 more than this share away from the config's own target is marked "off target"
OFF_MARK = " ⚠"
RECORD_TABLES = [  # (title, what it measures, [(record key, header, format)]): the record tables of report.md
    ("Reconstruction and sparsity",
     "How well each dictionary rebuilds the activation it writes (FVU: share of variance left unexplained; 0 is "
     "perfect) at what sparsity (L0: active latents per token), on the held-out tokens. FVU compares only between "
     "dictionaries writing the same space. ⚠ marks an L0 more than 20 % from the config's own target.",
     [("name", "decomposer", "{}"), ("kind", "kind", "{}"), ("hookpoint_out", "writes", "{}"),
      ("n_features", "features", "{:,}"), ("l0", "L0", "{:.1f}"), ("l0_target", "L0 target", "{:g}"),
      ("fvu", "FVU", "{:.4f}"), ("explained_variance", "expl. var", "{:.3f}"), ("cossim", "cos", "{:.3f}"),
      ("l2_ratio", "L2 ratio", "{:.3f}"), ("relative_reconstruction_bias", "rel. bias", "{:.3f}"),
      ("dead_fraction", "dead", "{:.3f}"), ("dense_fraction", "dense", "{:.3f}")]),
    ("Downstream loss",
     "The model's next-token loss (nats per token) clean, with the dictionary spliced in, and with the activation "
     "zeroed; CE score = share of the zeroing's loss the dictionary recovers (1: as good as the model).",
     [("name", "decomposer", "{}"), ("ce_clean", "CE clean", "{:.3f}"), ("ce_spliced", "CE spliced", "{:.3f}"),
      ("ce_ablated", "CE ablated", "{:.3f}"), ("ce_loss_score", "CE score", "{:.3f}"), ("kl_score", "KL score", "{:.3f}")]),
    ("Sparse probing and absorption",
     "Accuracy of a logistic probe on the k latents that best separate each task's classes (mean over tasks), and "
     "the share of first-letter cases where another latent absorbs the letter's feature (lower is better).",
     [("name", "decomposer", "{}"), ("sparse_probe_k1", "probe k=1", "{:.3f}"), ("sparse_probe_k5", "probe k=5", "{:.3f}"),
      ("absorption_rate", "absorption", "{:.3f}")]),
]
COLUMNS = list(dict.fromkeys(c for _, _, cols in RECORD_TABLES for c in cols))  # every record key tabulated
STEERING_COLUMNS = [  # keys of a steering record's "summary"
    ("detection_auc", "detection AUC", "{:.3f}"), ("concept_rate", "concept rate", "{:.3f}"),
    ("gain_over_random", "gain vs random", "{:+.3f}"), ("p_value", "p", "{:.3g}"), ("fluency", "fluency", "{:.3f}"),
    ("combined", "combined", "{:.3f}"), ("feature_concept", "feature concept", "{:.3f}"),
    ("feature_fluency", "feature fluency", "{:.3f}"), ("feature_combined", "feature combined", "{:.3f}"),
]


def off_target(record: dict[str, Any]) -> bool:
    """Whether the record's L0 is more than OFF_TARGET away from its config's own target (False without one)."""
    target, l0 = record.get("l0_target"), record.get("l0")
    return _finite(target, l0) and target > 0 and abs(l0 - target) > OFF_TARGET * target


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


def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    text = _fmt(r.get(key), fmt)
    return text + OFF_MARK if key == "l0" and off_target(r) else text


def record_tables(records: list[dict[str, Any]]) -> list[str]:
    """One table per RECORD_TABLES entry that has a value in some record, each under its sentence."""
    parts = []
    for title, sentence, cols in RECORD_TABLES:
        if not any(r.get(k) is not None for r in records for k, _, _ in cols[1:]):
            continue
        parts += ["", f"## {title}", "", sentence, "",
                  _table([h for _, h, _ in cols], [[_cell(r, k, f) for k, _, f in cols] for r in records])]
    return parts


def _ci(summary: dict[str, Any]) -> str:
    ci = summary.get("concept_rate_ci")
    rate = _fmt(summary.get("concept_rate"), "{:.3f}")
    return f"{rate} [{_fmt(ci[0], '{:.2f}')}, {_fmt(ci[1], '{:.2f}')}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else rate


def _gates(summary: dict[str, Any]) -> str:
    g = summary.get("gate_removed") or {}
    return " / ".join(_fmt(g.get(k), "{:.0%}") for k in ("loss", "bigram", "either")) if g else "-"


def steering_section(steering: dict[str, Any], page: str | None = None) -> list[str]:
    """The steering tables (concept rate with its 95 % interval, scores and gate shares) and skipped vectors."""
    recs = steering.get("records") or {}
    parts = ["", "## Steering"] if recs or steering.get("skipped") else []
    if recs:
        kl = next((r["summary"].get("kl_target") for r in recs.values() if r.get("summary")), None)
        main, scores = [], []
        for name, rec in recs.items():
            s = rec.get("summary") or {}
            head = [name, str(rec.get("kind")), str(rec.get("hookpoint"))]
            main.append(head + [_fmt(s.get("detection_auc"), "{:.3f}"), _ci(s), _fmt(s.get("n_continuations"), "{}"),
                                _fmt(s.get("gain_over_random"), "{:+.3f}"), _fmt(s.get("p_value"), "{:.3g}"),
                                _fmt(s.get("fluency"), "{:.3f}"), _fmt(s.get("combined"), "{:.3f}")])
            scores.append([name] + [_fmt(s.get(k), "{:.3f}") for k in ("feature_concept", "feature_fluency",
                                                                       "feature_combined", "input_score", "output_score")]
                          + [_gates(s)])
        parts += ["", f"At KL {_fmt(kl, '{:g}')} from the unsteered model, sign +1. Concept rate: share of steered "
                  "continuations both judges call on-topic, with its 95 % Wilson interval over n continuations; p: "
                  "one-sided test of the gain over a random direction of the same KL.", "",
                  _table(["vector", "kind", "hookpoint", "detection AUC", "concept rate [95 % CI]", "n",
                          "gain vs random", "p", "fluency", "combined"], main),
                  "", "Per-feature scores of each dictionary's best feature per concept (input score: the concept "
                  "read from its top activating contexts; output score: from its promoted tokens, by the same judges), "
                  "and the share of continuations each fluency gate removed (loss / bigram / either).", "",
                  _table(["vector", "feature concept", "feature fluency", "feature combined", "input score",
                          "output score", "gates removed (loss / bigram / either)"], scores)]
    for name, why in (steering.get("skipped") or {}).items():
        parts += ["", f"{name} is not steered: {why}"]
    judges = steering.get("judges")
    if judges:
        parts += ["", "Judges: held-out accuracy " + ", ".join(f"{k} {_fmt(v, '{:.3f}')}" for k, v in
                                                               (judges.get("heldout_accuracy") or {}).items())]
    if page:
        parts += ["", f"Every judged continuation, side by side: [{page}]({page})."]
    return parts


def _skipped(result: dict[str, Any], what: str) -> list[str]:
    return [f"{name}: no {what} ({why})" for name, why in (result.get("skipped") or {}).items()]


def probing_section(probing: dict[str, Any] | None, absorption: dict[str, Any] | None) -> list[str]:
    """Sparse probing per decomposer and k, the full-activation probe per task, and absorption with the
    first-letter probe's own accuracy (so a reader sees whether the model carries the signal at all)."""
    parts = []
    if probing and probing.get("records"):
        ks = sorted({k for r in probing["records"].values() for k in (r.get("mean") or {})}, key=float)
        rows = [[name, str(r.get("hookpoint"))] + [_fmt((r.get("mean") or {}).get(k), "{:.3f}") for k in ks]
                + [_fmt(r.get("full_mean"), "{:.3f}")] for name, r in probing["records"].items()]
        parts += ["", "### Sparse probing", "", "Test accuracy of a logistic probe on the k latents whose mean differs "
                  "most between the classes, averaged over the tasks; the last column probes the full activation "
                  "at the same hookpoint (the ceiling).", "",
                  _table(["decomposer", "reads"] + [f"k={k}" for k in ks] + ["full activation"], rows)]
        tasks = probing.get("tasks") or {}
        if tasks:
            hps = sorted({h for t in tasks.values() for h in (t.get("full_accuracy") or {})})
            parts += ["", "Each task's classes, sizes and full-activation probe accuracy per hookpoint.", "",
                      _table(["task", "classes", "train", "test"] + hps,
                             [[task, ", ".join(map(str, t.get("classes") or [])), _fmt(t.get("n_train"), "{}"),
                               _fmt(t.get("n_test"), "{}")] + [_fmt((t.get("full_accuracy") or {}).get(h), "{:.3f}")
                                                              for h in hps] for task, t in tasks.items()])]
        parts += [""] + _skipped(probing, "sparse probing") if probing.get("skipped") else []
    if absorption and absorption.get("records"):
        rows = [[name, str(r.get("hookpoint"))] + [_fmt(r.get(k), f) for k, f in (
            ("absorption_rate", "{:.3f}"), ("full_absorption_rate", "{:.3f}"), ("mean_f1", "{:.3f}"),
            ("n_letters", "{}"), ("probe_accuracy", "{:.3f}"))] for name, r in absorption["records"].items()]
        parts += ["", "### Feature absorption (first letter)", "", "On words whose first letter a linear probe reads, "
                  "the mean share of the probe direction carried by other latents instead of the letter's own "
                  "(absorption: SAEBench's absorption fraction, partial absorption included), the share of words "
                  "where the letter's latents do not fire at all and one other latent carries it (full absorption), "
                  "the letter latents' mean F1, and the first-letter probe's own accuracy.", "",
                  _table(["decomposer", "reads", "absorption", "full absorption", "mean F1", "letters",
                          "letter probe acc."], rows)]
        probes = absorption.get("probe") or {}
        if probes:
            parts += ["", "The first-letter probe on the model's own activation (chance: the commonest letter's share).",
                      "", _table(["hookpoint", "accuracy", "chance", "train", "test"],
                                 [[h, _fmt(p.get("accuracy"), "{:.3f}"), _fmt(p.get("chance"), "{:.3f}"),
                                   _fmt(p.get("n_train"), "{}"), _fmt(p.get("n_test"), "{}")] for h, p in probes.items()])]
        parts += [""] + _skipped(absorption, "absorption") if absorption.get("skipped") else []
    return (["", "## Sparse probing and absorption, in detail"] + parts) if parts else []


def matching_section(matching: dict[str, Any] | None, plot: str | None = None) -> list[str]:
    """The feature-matching table: best-match decoder cosines and activation correlations per pair."""
    if not matching or not (matching.get("pairs") or matching.get("skipped")):
        return []
    rows = [[str(p.get("a")), str(p.get("b")), str(p.get("space")), str(p.get("relation"))]
            + [_fmt(p.get(k), f) for k, f in (("decoder_cos_mean", "{:.3f}"), ("decoder_cos_median", "{:.3f}"),
                                             ("decoder_frac_above_0.7", "{:.3f}"), ("activation_corr_mean", "{:.3f}"),
                                             ("activation_corr_median", "{:.3f}"), ("n_rows", "{:,}"))]
            for p in matching.get("pairs") or []]
    parts = ["", "## Feature matching", "", "For each feature of a, its best match in b writing the same space: the "
             "cosine of their decoder directions (mean, median, share above 0.7) and the correlation of their "
             "activations on the same held-out tokens. Same kind at one hookpoint = stability across seeds."]
    if rows:
        parts += ["", _table(["a", "b", "space", "relation", "dec. cos mean", "dec. cos median", "cos > 0.7",
                              "act. corr mean", "act. corr median", "rows"], rows)]
    if plot:
        parts += ["", f"![matching]({plot})"]
    return parts + ([""] + _skipped(matching, "matching") if matching.get("skipped") else [])


OOD_KEYS = (("fvu", "FVU", "{:.4f}"), ("l0", "L0", "{:.1f}"), ("ce_loss_score", "CE score", "{:.3f}"))


def ood_section(records: list[dict[str, Any]], ood: dict[str, Any] | None) -> list[str]:
    """In-distribution and each other text's FVU, L0 and CE score side by side, per decomposer."""
    if not ood:
        return []
    labels = list(ood)
    by_label = {lab: {r.get("name"): r for r in (ood[lab].get("records") or [])} for lab in labels}
    names = list(dict.fromkeys([r.get("name") for r in records] + [n for lab in labels for n in by_label[lab]]))
    here = {r.get("name"): r for r in records}
    headers, rows = ["decomposer"], []
    for _, head, _ in OOD_KEYS:
        headers += [f"{head} (in dist.)"] + [f"{head} ({lab})" for lab in labels]
    for n in names:
        row = [str(n)]
        for key, _, fmt in OOD_KEYS:
            row += [_fmt((here.get(n) or {}).get(key), fmt)] + [_fmt((by_label[lab].get(n) or {}).get(key), fmt)
                                                                for lab in labels]
        rows.append(row)
    texts = "; ".join(f"{lab}: {_fmt(ood[lab].get('n_tokens'), '{:,}')} held-out tokens of "
                      f"`{ood[lab].get('corpus')}`" for lab in labels)
    return ["", "## Out of distribution", "", f"The same dictionaries scored on other text ({texts}) next to the "
            "training distribution's held-out tokens: a rise in FVU or fall in CE score is what they lose off "
            "their training text.", "", _table(headers, rows)]


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], steering: dict[str, Any] | None = None,
             plots: list[str] = (), sections: dict[str, Any] | None = None, steering_page: str | None = None) -> str:
    """report.md: the record tables, then each section present (steering, probing and absorption, matching,
    out of distribution), then the plots. A section that is absent or None is left out."""
    sections = sections or {}
    plots = list(plots)
    match_plot = next((p for p in plots if Path(p).name == "matching.png"), None)
    parts = [
        "# Evaluation report", "",
        f"Model `{meta.get('model')}`, cache `{meta.get('cache')}`. Reconstruction and sparsity on "
        f"{_fmt(records[0].get('n_tokens') if records else None, '{:,}')} held-out tokens; downstream loss on "
        f"{_fmt(records[0].get('n_downstream_tokens') if records else None, '{:,}')} next-token predictions "
        f"(CE in nats; score = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)). "
        f"Evaluation took {_fmt(meta.get('seconds'), '{:.0f}')} s.",
    ] + record_tables(records) + per_site_section(records)
    if steering:
        parts += steering_section(steering, steering_page)
    parts += probing_section(sections.get("probing"), sections.get("absorption"))
    parts += matching_section(sections.get("matching"), match_plot)
    parts += ood_section(records, sections.get("ood"))
    rest = [p for p in plots if p != match_plot]
    if rest:
        parts += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in rest]
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


def _mark_off(ax: Any, rs: list[dict[str, Any]], key: str) -> bool:
    """Ring the points whose L0 is off their target; True when some were."""
    off = [r for r in rs if off_target(r)]
    if off:
        ax.scatter([r["l0"] for r in off], [r[key] for r in off], s=170, facecolors="none", edgecolors="red",
                   linewidths=1.5, zorder=4, label=f"L0 > {OFF_TARGET:.0%} off its target")
    return bool(off)


def _log_l0_axis(ax: Any, l0s: list[float]) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    if max(l0s) > 10 * max(min(l0s), 1e-9):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())


def _scatter_panel(ax: Any, pts: list[dict[str, Any]], key: str, colour: dict[str, Any], front: bool) -> None:
    for k in sorted({r["kind"] for r in pts}):
        mine = [r for r in pts if r["kind"] == k]
        ax.scatter([r["l0"] for r in mine], [r[key] for r in mine], color=colour[k], label=k, zorder=3)
        for r in mine:
            ax.annotate(r["name"], (r["l0"], r[key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if front:
            f = pareto_front([(r["l0"], r[key]) for r in mine])
            ax.plot([p[0] for p in f], [p[1] for p in f], color=colour[k], alpha=0.6)
    _mark_off(ax, pts, key)
    ax.margins(0.15)  # room for the names written next to the points
    ax.set_xlabel("L0 (active features per token)")
    _log_l0_axis(ax, [r["l0"] for r in pts])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_fvu(records: list[dict[str, Any]], colour: dict[str, Any], plt: Any) -> Any | None:
    """FVU against L0, one panel per space written (FVU in different spaces does not compare)."""
    pts = [r for r in records if _finite(r.get("l0"), r.get("fvu"))]
    if not pts:
        return None
    spaces = list(dict.fromkeys(str(r.get("hookpoint_out")) for r in pts))
    fig, axes = plt.subplots(1, len(spaces), figsize=(5.2 * len(spaces), 4.5), squeeze=False)
    for ax, space in zip(axes[0], spaces):
        _scatter_panel(ax, [r for r in pts if str(r.get("hookpoint_out")) == space], "fvu", colour, front=True)
        ax.set_title(f"writes {space}")
    axes[0][0].set_ylabel("FVU (fraction of variance unexplained)")
    fig.tight_layout()
    return fig


def plot_ce_score(records: list[dict[str, Any]], colour: dict[str, Any], plt: Any) -> Any | None:
    pts = [r for r in records if _finite(r.get("l0"), r.get("ce_loss_score"))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    _scatter_panel(ax, pts, "ce_loss_score", colour, front=False)
    ax.set_ylabel("CE-loss score (share of the ablation's loss recovered)")
    fig.tight_layout()
    return fig


def plot_downstream(records: list[dict[str, Any]], plt: Any) -> Any | None:
    """The loss added by splicing each dictionary in (nats per token), its CE score written on the bar."""
    pts = [r for r in records if _finite(r.get("ce_spliced"), r.get("ce_clean"))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(pts) + 1.6))
    rise = [r["ce_spliced"] - r["ce_clean"] for r in pts]
    ax.barh([r["name"] for r in pts], rise, color=["tab:red" if off_target(r) else "tab:blue" for r in pts])
    for i, (r, v) in enumerate(zip(pts, rise)):
        ax.annotate(f"{v:.3f} nats" + (f", score {r['ce_loss_score']:.3f}" if _finite(r.get("ce_loss_score")) else ""),
                    (max(v, 0), i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"CE loss increase when spliced in (nats per token; clean CE {pts[0]['ce_clean']:.3f} nats)")
    ax.set_xlim(0, max(max(rise), 1e-6) * 1.45)
    if any(off_target(r) for r in pts):
        ax.set_title("red: L0 off its target", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


STEERING_PANELS = [("concept", "concept_curve", "concept_rate"), ("fluency", "concept_curve", "fluency"),
                   ("combined", "concept_curve", "combined"), ("feature concept", "feature_curve", "concept"),
                   ("feature fluency", "feature_curve", "fluency"), ("feature combined", "feature_curve", "combined")]


def plot_steering(steering: dict[str, Any], plt: Any) -> Any | None:
    """Scores against the KL target, one line per vector; with a single KL target, one bar per vector (with
    the concept rate's 95 % interval when the points carry it) instead of lines of one point."""
    from matplotlib.ticker import NullFormatter

    recs = steering.get("records") or {}
    targets = sorted({p["kl_target"] for rec in recs.values()
                      for p in (rec.get("concept_curve") or []) + (rec.get("feature_curve") or [])
                      if _finite(p.get("kl_target"))})
    if not targets:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    handles: dict[str, Any] = {}
    for ax, (title, curve, key) in zip(axes.flat, STEERING_PANELS):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        names, values, errs = [], [], []
        for name, rec in recs.items():
            pts = sorted((p["kl_target"], p.get(key), p.get(f"{key}_ci")) for p in rec.get(curve) or []
                         if p.get("sign", 1) == 1 and _finite(p.get("kl_target"), p.get(key)))
            if not pts:
                continue
            if len(targets) > 1:
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                                  linestyle="--" if rec.get("kind") in ("diffmean", "random") else "-")
                handles.setdefault(name, line)
            else:
                names.append(name)
                values.append(pts[0][1])
                summary = rec.get("summary") or {}
                ci = pts[0][2] or (summary.get(f"{key}_ci") if summary.get("kl_target") == pts[0][0] else None)
                errs.append((pts[0][1] - ci[0], ci[1] - pts[0][1]) if isinstance(ci, (list, tuple)) and len(ci) == 2
                            else (0.0, 0.0))
        if len(targets) > 1:
            ax.set_xlabel("KL target (nats)")
            ax.set_xscale("log")
            ax.set_xticks(targets, [f"{t:g}" for t in targets])
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif names:
            yerr = np.array(errs).T if any(e != (0.0, 0.0) for e in errs) else None
            bars = ax.bar(range(len(names)), values, yerr=yerr, capsize=3,
                          color=["tab:gray" if recs[n].get("kind") in ("diffmean", "random") else "tab:blue" for n in names])
            ax.bar_label(bars, fmt="%.2g", fontsize=6)  # a zero shows as 0, not as a missing bar
            ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
            ax.set_ylabel(f"at KL {targets[0]:g} nats")
    if not handles and len(targets) > 1:
        plt.close(fig)
        return None
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=8)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    else:
        fig.suptitle(f"Steering at the one KL target, {targets[0]:g} nats (grey: DiffMean and random references)")
        fig.tight_layout()
    return fig


def plot_all(records: list[dict[str, Any]], folder: Path, steering: dict[str, Any] | None = None,
             sections: dict[str, Any] | None = None) -> list[str]:
    """Write the PNG plots under folder; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    kinds = sorted({r["kind"] for r in records})
    colour = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}

    def save(fig: Any, fname: str, dpi: int = 110) -> None:
        if fig is not None:
            _save_png(fig, folder / fname, dpi=dpi)
            plt.close(fig)
            written.append(fname)

    save(plot_fvu(records, colour, plt), "fvu_vs_l0.png")
    save(plot_ce_score(records, colour, plt), "ce_score_vs_l0.png")
    save(plot_downstream(records, plt), "downstream.png")
    save(plot_freq_hist(records, plt), "freq_hist.png")
    if steering and steering.get("records"):
        save(plot_steering(steering, plt), "steering_curves.png", dpi=100)
    matching = (sections or {}).get("matching")
    if matching and matching.get("pairs"):
        from dictlearn.eval.matching import plot_matching  # the matching stage's own plot

        if plot_matching(matching, folder / "matching.png"):
            written.append("matching.png")
    return written


def plot_freq_hist(records: list[dict[str, Any]], plt: Any) -> Any | None:
    hists = [r for r in records if r.get("freq_hist")]
    if not hists:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in hists:
        h = r["freq_hist"]
        total = max(r.get("n_features") or sum(h["counts"]) + h["dead"], 1)
        ax.stairs([c / total for c in h["counts"]], h["log10_edges"], label=f"{r['name']} (dead {h['dead'] / total:.1%})")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("fraction of features")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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
    plots = plot_all(records, out / "plots", steering, sections)
    page = "steering/index.html" if (out / "steering" / "index.html").is_file() else None
    atomic_write_text(out / "report.md", markdown(meta, records, steering, [f"plots/{p}" for p in plots], sections, page))
