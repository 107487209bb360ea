"""Every judged continuation of a steering evaluation, stored and shown: continuations.jsonl (one object a
line) and index.html, a static page with the unsteered, DiffMean, random and each decomposer's continuations
side by side per prompt, so a reader can audit each verdict (the judges' and the fluency gates')."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

from dictlearn.eval.steering.records import SteeringResult
from dictlearn.eval.steering.stats import wilson_interval
from dictlearn.files import atomic_write_text

CONTINUATIONS = "continuations.jsonl"
PAGE = "index.html"


def write_continuations(folder: str | Path, result: SteeringResult) -> Path:
    """folder/continuations.jsonl: every generated continuation with its condition, text, each judge's verdict
    and each gate's value and verdict (what the steering rates are counted from)."""
    lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in result.continuations)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(folder) / CONTINUATIONS, lines)


def _columns(result: SteeringResult) -> list[tuple[str, tuple]]:
    """(column title, condition) shown on the page: the unsteered run, then per record its concept vectors at
    the summary KL and the first scored sign (a decomposer without concepts: its sampled features)."""
    cfg = result.config
    kl, sign = cfg["summary_kl"], cfg["signs"][0]
    conds: dict[tuple, str] = {}
    for c in result.continuations:
        cond = (c["record"], c["vector"], c["kl_target"], c["sign"])
        if cond in conds:
            continue
        if c["record"] == "unsteered":
            conds[cond] = "unsteered"
        elif c["kl_target"] == kl and c["sign"] == sign and (c["concepts"] or c["kind"] == "random"
                                                              or not cfg["concepts"]):
            what = c["vector"] + (f" ({', '.join(c['concepts'])})" if c["concepts"] and c["kind"] != "diffmean" else "")
            conds[cond] = f"{c['record']}: {what}"
    order = ["unsteered", *result.records]
    return sorted(((t, k) for k, t in conds.items()), key=lambda x: (order.index(x[1][0]) if x[1][0] in order
                                                                    else len(order), x[0]))


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "<td></td>"
    fluent = c["loss_ok"] and c["bigram_ok"]
    cls = "on" if c["on_topic"] else ("gated" if not fluent else "off")
    gates = (f"loss {c['loss']:.2f}{'' if c['loss_ok'] else ' ✗'} · bigrams {c['bigram_share']:.2f}"
             f"{'' if c['bigram_ok'] else ' ✗'}")
    judges = "" if c["probe"] is None else f"probe {html.escape(c['probe'])} · lexical {html.escape(c['lexical'])} · "
    return (f'<td class="{cls}"><div class="t">{html.escape(c["text"])}</div>'
            f'<div class="v">{judges}{gates}</div></td>')


def _summary_rows(result: SteeringResult, columns: Sequence[tuple[str, tuple]]) -> str:
    rows = []
    for title, (record, vector, kl, sign) in columns:
        cs = [c for c in result.continuations if (c["record"], c["vector"], c["kl_target"], c["sign"]) ==
              (record, vector, kl, sign)]
        k, n = sum(bool(c["on_topic"]) for c in cs), len(cs)
        lo, hi = wilson_interval(k, n) if n else (0.0, 0.0)
        removed = sum(not (c["loss_ok"] and c["bigram_ok"]) for c in cs)
        reached = "" if cs[0]["kl"] is None else f"{cs[0]['kl']:.3g}"
        rows.append(f"<tr><td>{html.escape(title)}</td><td>{html.escape(reached)}</td><td>{k}/{n}</td>"
                    f"<td>{k / max(n, 1):.3f} [{lo:.3f}, {hi:.3f}]</td><td>{removed / max(n, 1):.0%}</td></tr>")
    return "\n".join(rows)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; }
.side td { width: 16em; min-width: 12em; font-size: 0.85em; }
.side th { font-size: 0.8em; background: #f3f3f3; position: sticky; top: 0; }
.t { white-space: pre-wrap; }
.v { color: #666; font-size: 0.85em; margin-top: 3px; }
td.on { background: #dff3df; }
td.gated { background: #f4f4f4; color: #888; }
.wrap { overflow-x: auto; }
"""


def page_html(result: SteeringResult) -> str:
    """The side-by-side page (plain HTML, every text escaped)."""
    cfg = result.config
    columns = _columns(result)
    by_cond: dict[tuple, dict[tuple[int, int], dict[str, Any]]] = {}
    for c in result.continuations:
        key = (c["record"], c["vector"], c["kl_target"], c["sign"])
        by_cond.setdefault(key, {})[(c["prompt_index"], c["sample"])] = c
    prompts = sorted({(c["prompt_index"], c["prompt"]) for c in result.continuations})
    samples = sorted({c["sample"] for c in result.continuations})
    concepts = ", ".join(cfg.get("concepts") or []) or "none"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Steered continuations</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Steered continuations</h1>",
        f"<p>Concepts: {html.escape(concepts)}. Each column is one steering vector at KL {cfg['summary_kl']:g} "
        f"(sign {cfg['signs'][0]:+d}), calibrated on the same prompts; every prompt is continued "
        f"{cfg['samples_per_prompt']} times per vector with the same random numbers per (prompt, sample). "
        "<span style='background:#dff3df'>Green</span>: on-topic (both judges name the vector's concept and the "
        "continuation passes both fluency gates); <span style='color:#888'>grey</span>: removed by a fluency gate "
        "(✗ marks the failing gate: loss above the unsteered mean plus the margin, or too few distinct bigrams). "
        "Every continuation, of every KL target and sign, is in continuations.jsonl.</p>",
        "<h2>Per column</h2><table><tr><th>vector</th><th>KL reached</th><th>on-topic</th>"
        "<th>rate [95 % Wilson]</th><th>removed by a gate</th></tr>",
        _summary_rows(result, columns), "</table>"]
    for i, prompt in prompts:
        parts.append(f"<h2>{i + 1}. “{html.escape(prompt)}”</h2><div class='wrap'><table class='side'><tr>"
                     + "".join(f"<th>{html.escape(t)}</th>" for t, _ in columns) + "</tr>")
        for j in samples:
            parts.append("<tr>" + "".join(_cell(by_cond.get(cond, {}).get((i, j))) for _, cond in columns) + "</tr>")
        parts.append("</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(folder: str | Path, result: SteeringResult) -> Path:
    """folder/index.html: the continuations side by side per prompt."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(folder) / PAGE, page_html(result))
