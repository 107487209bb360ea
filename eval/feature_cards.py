"""Feature cards: what each feature fires on and what it promotes, as JSON and as static HTML.

A card holds a feature's firing frequency, mean activation (over the tokens it fires on) and max activation
on the evaluated rows, its top activating contexts (a window of tokens around each of its strongest rows,
taken from the cache's stored token ids, the row's own token highlighted), and its vocabulary projection:
the tokens whose logits the feature's direction raises most along the direct path to the logits,
logits = W_U (g * v), with v the direction, g the product of every norm gain between its hookpoint and the
logits (a post-norm's for a pre-norm output, the final norm's; Gemma's RMSNorms multiply by 1 + w) and W_U the
unembedding (dictlearn.activations.families.logit_lens). A direction in the MLP hidden layer (semi-NMF, or
anything writing `mlp_hidden`) is first mapped through the MLP's output projection, v = f W_out.

Layout of feature_cards/<name>/: cards.json (the selected features' cards), features.json (frequency,
mean and max activation of every feature), index.html and features/<index>.html (no JavaScript, no
external files).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dictlearn.activations import families
from dictlearn.activations import hookpoints as hpmod
from dictlearn.eval.reconstruction import ACT_BIN_EDGES

def vocab_projection(model: torch.nn.Module, hookpoint: hpmod.Hookpoint | str | list[hpmod.Hookpoint | str],
                     directions: np.ndarray, k: int = 10, chunk: int = 256, lowest: bool = False
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """(token ids (n, k), logit values (n, k)) of the tokens each direction promotes most (lowest: suppresses
    most, the most negative logits first); None if unmappable.

    directions (n, d) at one hookpoint, or (n, S, d) with a list of S hookpoints: a latent writing to several
    sites (a cross-layer transcoder's) promotes what its writes add to the logits together. Directions at an
    MLP hidden site go through the output projection first (families.to_residual); then every norm gain
    between there and the logits applies (families.lens_gain). Chunked over features, so projecting a whole
    dictionary never holds more than chunk x vocab logits."""
    hps = hookpoint if isinstance(hookpoint, (list, tuple)) else [hookpoint]
    names = [h.name if isinstance(h, hpmod.Hookpoint) else h for h in hps]
    dirs = np.asarray(directions, np.float32)
    dirs = dirs[:, None] if dirs.ndim == 2 else dirs
    if dirs.shape[1] != len(names):
        raise ValueError(f"directions have {dirs.shape[1]} sites but {len(names)} hookpoints were given")
    try:
        total = None
        for s, name in enumerate(names):
            where, resid = families.to_residual(model, name, dirs[:, s])
            part = resid * families.lens_gain(model, where)
            total = part if total is None else total + part
    except hpmod.HookpointError:
        return None
    unembed = model.get_output_embeddings().weight.detach().float().cpu()
    lens = families.LogitLens(np.ones(total.shape[1], np.float32), unembed)
    if not lowest:
        return lens.top_tokens(total, k=k, chunk=chunk)
    ids, vals = lens.top_tokens(-total, k=k, chunk=chunk)  # the lens is linear: the top of -v is the bottom of v
    return ids, -vals


def select_features(frequency: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """A seeded uniform sample of n live features (all live ones if fewer), in index order: an unbiased view."""
    live = np.flatnonzero(frequency > 0)
    if len(live) <= n:
        return live.tolist()
    return np.sort(np.random.default_rng(seed).choice(live, size=n, replace=False)).tolist()


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def build_cards(
    features: list[int],
    stats: dict[str, np.ndarray],
    top_vals: np.ndarray,
    top_rows: np.ndarray,
    row_seq: np.ndarray,
    row_pos: np.ndarray,
    sequence_tokens: Callable[[np.ndarray], np.ndarray],
    tokenizer,
    vocab: tuple[np.ndarray, np.ndarray] | None = None,
    window: tuple[int, int] = (12, 4),
    sites: list[str] = (),
    suppressed: tuple[np.ndarray, np.ndarray] | None = None,
    histograms: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Cards of the given features.

    top_vals/top_rows (n_features, k): each feature's strongest activations and their row numbers among the
    evaluated rows; row_seq/row_pos map a row number to its (sequence id, position); sequence_tokens(seq_ids)
    returns the (n, context) token ids; vocab is `vocab_projection` for the same features (in this order);
    window = (tokens before, tokens after) the activating token; sites: the hookpoints the latents are read at,
    latent s * (n / S) + f being latent f of site s (a cross-layer transcoder's source layers): each card then
    names its site and its latent there. suppressed: `vocab_projection(..., lowest=True)` for the same features;
    histograms (n_features, bins): each feature's nonzero activations per ACT_BIN_EDGES bin."""
    before, after = window
    per_site = len(stats["frequency"]) // max(len(sites), 1)
    needed = sorted({int(row_seq[r]) for f in features for v, r in zip(top_vals[f], top_rows[f]) if v > 0 and r >= 0})
    tokens = dict(zip(needed, sequence_tokens(np.asarray(needed, np.int64)))) if needed else {}
    cards = []
    for j, f in enumerate(features):
        contexts = []
        for v, r in zip(top_vals[f], top_rows[f]):
            if not (v > 0 and r >= 0):
                continue
            seq, pos = int(row_seq[r]), int(row_pos[r])
            ids = tokens[seq]
            lo, hi = max(0, pos - before), min(len(ids), pos + after + 1)
            contexts.append({
                "activation": float(v), "seq": seq, "pos": pos,
                "token_ids": [int(t) for t in ids[lo:hi]],
                "tokens": [_token_text(tokenizer, t) for t in ids[lo:hi]],
                "highlight": pos - lo,
            })
        card = {
            "index": int(f),
            **({"site": sites[f // per_site], "latent": int(f % per_site)} if sites else {}),
            "frequency": float(stats["frequency"][f]),
            "mean_activation": float(stats["mean_activation"][f]),
            "max_activation": float(stats["max_activation"][f]),
            "contexts": contexts,
        }
        for key, proj in (("vocab", vocab), ("suppressed", suppressed)):
            if proj is not None:
                card[key] = [{"id": int(t), "token": _token_text(tokenizer, t), "logit": float(l)}
                             for t, l in zip(proj[0][j], proj[1][j])]
        if histograms is not None:
            card["histogram"] = {"log10_edges": ACT_BIN_EDGES.tolist(), "counts": [int(c) for c in histograms[f]]}
        cards.append(card)
    return cards


def window_positions(cards: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Every (sequence, position) a card's context shows, each once, in order."""
    return list(dict.fromkeys((c["seq"], c["pos"] - c["highlight"] + i) for card in cards for c in card["contexts"]
                              for i in range(len(c["tokens"]))))


def window_activations(cache: Any, keys: list[str], wanted: list[tuple[int, int]]) -> tuple[list[int], dict[str, np.ndarray]]:
    """The cached activations at (sequence, position) pairs: (for each pair its row in the returned arrays, or
    -1 where the harvest left the position out (the sink, special tokens), {key: (n_found, d) float32}).

    The cache holds every kept token of a sequence in that sequence's shard, so a context window's activations
    are read back instead of running the model again: the very activations the card's statistics came from."""
    found: list[int] = [-1] * len(wanted)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    n = 0
    by_shard: dict[int, list[int]] = {}
    for i, (seq, _) in enumerate(wanted):
        shard = next((j for j, s in enumerate(cache.shards) if s["seq_start"] <= seq < s["seq_stop"]), None)
        if shard is not None:
            by_shard.setdefault(shard, []).append(i)
    for shard, idx in by_shard.items():
        arrays = cache.shard_arrays(shard, ["seq", "pos"])
        row_of = {(int(q), int(p)): r for r, (q, p) in enumerate(zip(arrays["seq"], arrays["pos"]))}
        hits = [(i, row_of[wanted[i]]) for i in idx if wanted[i] in row_of]
        if not hits:
            continue
        rows = np.array([r for _, r in hits])
        acts = cache.shard_arrays(shard, keys)
        order = np.argsort(rows)  # sorted reads from the memory map
        for k in keys:
            parts[k].append(_as_f32(acts[k][rows[order]]))
        for j, o in enumerate(order):
            found[hits[o][0]] = n + j
        n += len(hits)
    return found, {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in parts.items()}


def _as_f32(a: np.ndarray) -> np.ndarray:
    from dictlearn.activations.cache import to_float32

    return to_float32(a)


def shade_contexts(cards: list[dict[str, Any]], positions: list[tuple[int, int]], found: list[int],
                   codes: np.ndarray) -> None:
    """Give every context a "shade": the card's feature's activation on each of its tokens (None where the cache
    holds no activation). codes (n_found, n_latents) are the decomposer's codes of the rows `found` points to."""
    where = dict(zip(positions, found))
    for card in cards:
        f = card["index"]
        for c in card["contexts"]:
            start = c["pos"] - c["highlight"]
            rows = [where.get((c["seq"], start + i), -1) for i in range(len(c["tokens"]))]
            c["shade"] = [float(codes[r, f]) if r >= 0 else None for r in rows]


# --- writing -------------------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:75em;color:#222}
table{border-collapse:collapse}td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.ctx{font-family:monospace;white-space:pre-wrap;line-height:1.9}
.tok{border-right:1px dotted #ccc}.hi{outline:2px solid #c0392b;font-weight:bold;display:inline-block}.act{color:#888;font-size:.85em}
.vocab{display:flex;gap:2em;flex-wrap:wrap}.vocab table{font-family:monospace}.up td.v{color:#1a7f37}.down td.v{color:#b42318}
.none{color:#aaa}svg text{font-size:10px;fill:#555}"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def _show(token: str) -> str:
    return html.escape(token.replace("\n", "\u21b5"))


def shaded_tokens(context: dict[str, Any], scale: float) -> str:
    """The context's tokens, each shaded by the feature's activation on it (orange, relative to scale: the
    feature's max), the activating token outlined; the value in each token's tooltip."""
    shade = context.get("shade") or [None] * len(context["tokens"])
    spans = []
    for i, (t, a) in enumerate(zip(context["tokens"], shade)):
        alpha = 0.0 if a is None or scale <= 0 else min(max(a / scale, 0.0), 1.0)
        tip = "not stored (left out by the harvest)" if a is None else f"activation {a:.3g}"
        cls = "tok hi" if i == context["highlight"] else "tok"
        style = f" style='background:rgba(255,140,0,{alpha:.2f})'" if alpha > 0 else ""
        spans.append(f"<span class='{cls}'{style} title='{tip}'>{_show(t)}</span>")
    return "".join(spans)


def histogram_svg(hist: dict[str, Any], width: int = 480, height: int = 130) -> str:
    """An inline SVG bar chart of a feature's nonzero activations over log10 bins (only the occupied range)."""
    counts, edges = hist["counts"], hist["log10_edges"]
    used = [i for i, c in enumerate(counts) if c]
    if not used:
        return "<p class='none'>no activations on the evaluated tokens</p>"
    lo, hi = used[0], used[-1] + 1
    top, pad, base = max(counts[lo:hi]), 28, height - 22
    bw = (width - 2 * pad) / (hi - lo)
    bars, labels = [], []
    for j, i in enumerate(range(lo, hi)):
        h = (base - 8) * counts[i] / top
        bars.append(f"<rect x='{pad + j * bw:.1f}' y='{base - h:.1f}' width='{max(bw - 1, 1):.1f}' height='{h:.1f}' "
                    f"fill='#f28e2b'><title>{10 ** edges[i]:.3g} to {10 ** edges[i + 1]:.3g}: {counts[i]}</title></rect>")
    for j, i in enumerate(range(lo, hi + 1)):
        if float(edges[i]).is_integer() or i in (lo, hi):
            labels.append(f"<text x='{pad + j * bw:.1f}' y='{height - 6}' text-anchor='middle'>{10 ** edges[i]:.3g}</text>")
    return (f"<svg width='{width}' height='{height + 14}' role='img' aria-label='activation histogram'>"
            f"<text x='{width / 2}' y='{height + 10}' text-anchor='middle'>activation (log scale)</text>"
            f"<line x1='{pad}' y1='{base}' x2='{width - pad}' y2='{base}' stroke='#999'/>"
            f"<text x='{pad}' y='10'>{top} tokens</text>" + "".join(bars + labels) + "</svg>")


def _logit_table(title: str, cls: str, tokens: list[dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td class='l'>{_show(v['token'])}</td><td class='v'>{v['logit']:+.2f}</td></tr>" for v in tokens)
    return f"<div class='{cls}'><h3>{title}</h3><table><tr><th class='l'>token</th><th>logit</th></tr>{rows}</table></div>"


def feature_page(name: str, card: dict[str, Any]) -> str:
    scale = card["max_activation"]
    rows = [f"<tr><td>{c['activation']:.3f}</td><td class='l ctx'>{shaded_tokens(c, scale)}</td>"
            f"<td class='act'>seq {c['seq']} pos {c['pos']}</td></tr>" for c in card["contexts"]]
    vocab = ""
    if "vocab" in card or "suppressed" in card:
        vocab = ("<h2>Direct effect on the logits</h2><div class='vocab'>"
                 + (_logit_table("Promoted", "up", card["vocab"]) if "vocab" in card else "")
                 + (_logit_table("Suppressed", "down", card["suppressed"]) if "suppressed" in card else "") + "</div>")
    hist = ""
    if "histogram" in card:
        hist = ("<h2>Activation histogram</h2><p class='act'>nonzero activations on the evaluated tokens, log-spaced "
                "bins</p>" + histogram_svg(card["histogram"]))
    body = (f"<p><a href='../index.html'>&larr; {html.escape(name)}</a></p><h1>Feature {_title(card)}</h1>"
            f"<p>firing frequency {card['frequency']:.3g} &middot; mean activation {card['mean_activation']:.3g} "
            f"&middot; max activation {card['max_activation']:.3g}</p>{hist}{vocab}<h2>Top activating contexts</h2>"
            "<p class='act'>each token shaded by the feature's activation on it (darkest: the max activation); "
            "outlined: the activating token; hover a token for its value</p>"
            "<table><tr><th>activation</th><th class='l'>context</th><th></th></tr>" + "".join(rows) + "</table>")
    return _page(f"{name} feature {card['index']}", body)


def _title(card: dict[str, Any]) -> str:
    """"12", or "12 (latent 4 of mlp_in.2)" for a decomposer over several sites."""
    if "site" not in card:
        return str(card["index"])
    return f"{card['index']} (latent {card['latent']} of {html.escape(card['site'])})"


def _preview(context: dict[str, Any]) -> str:
    """A context as text with its activating token highlighted."""
    return "".join(f"<span class='hi'>{_show(t)}</span>" if i == context["highlight"] else _show(t)
                   for i, t in enumerate(context["tokens"]))


def index_page(name: str, meta: dict[str, Any], cards: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td class='l'><a href='features/{c['index']}.html'>{_title(c)}</a></td><td>{c['frequency']:.3g}</td>"
        f"<td>{c['mean_activation']:.3g}</td><td>{c['max_activation']:.3g}</td>"
        f"<td class='l ctx'>{_preview(c['contexts'][0]) if c['contexts'] else ''}</td>"
        f"<td class='l ctx'>{_show(' '.join(v['token'].strip() for v in c.get('vocab', [])[:5]))}</td></tr>"
        for c in cards)
    desc = ", ".join(f"{k} {html.escape(str(v))}" for k, v in meta.items())
    body = (f"<h1>Feature cards: {html.escape(name)}</h1><p>{desc}</p><p>{len(cards)} features shown (a seeded sample "
            "of the live ones); features.json has every feature's statistics.</p>"
            "<table><tr><th class='l'>feature</th><th>frequency</th><th>mean act</th><th>max act</th>"
            "<th class='l'>top context (outlined: the activating token)</th><th class='l'>promoted tokens</th></tr>" + rows + "</table>")
    return _page(f"{name} feature cards", body)


def write_cards(folder: str | Path, name: str, meta: dict[str, Any], cards: list[dict[str, Any]],
                stats: dict[str, np.ndarray]) -> Path:
    """Write cards.json, features.json, index.html and features/<i>.html under folder."""
    folder = Path(folder)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    for old in (folder / "features").glob("*.html"):  # a previous run may have shown other features
        old.unlink()
    (folder / "cards.json").write_text(json.dumps({"decomposer": name, **meta, "features": cards}, indent=1))
    (folder / "features.json").write_text(json.dumps({k: np.asarray(v).tolist() for k, v in stats.items()}))
    for c in cards:
        (folder / "features" / f"{c['index']}.html").write_text(feature_page(name, c))
    (folder / "index.html").write_text(index_page(name, meta, cards))
    return folder
