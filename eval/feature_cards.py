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

def vocab_projection(model: torch.nn.Module, hookpoint: hpmod.Hookpoint | str | list[hpmod.Hookpoint | str],
                     directions: np.ndarray, k: int = 10, chunk: int = 256) -> tuple[np.ndarray, np.ndarray] | None:
    """(token ids (n, k), logit values (n, k)) of the tokens each direction promotes most; None if unmappable.

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
    return families.LogitLens(np.ones(total.shape[1], np.float32), unembed).top_tokens(total, k=k, chunk=chunk)


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
) -> list[dict[str, Any]]:
    """Cards of the given features.

    top_vals/top_rows (n_features, k): each feature's strongest activations and their row numbers among the
    evaluated rows; row_seq/row_pos map a row number to its (sequence id, position); sequence_tokens(seq_ids)
    returns the (n, context) token ids; vocab is `vocab_projection` for the same features (in this order);
    window = (tokens before, tokens after) the activating token; sites: the hookpoints the latents are read at,
    latent s * (n / S) + f being latent f of site s (a cross-layer transcoder's source layers): each card then
    names its site and its latent there."""
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
        if vocab is not None:
            card["vocab"] = [{"id": int(t), "token": _token_text(tokenizer, t), "logit": float(l)}
                             for t, l in zip(vocab[0][j], vocab[1][j])]
        cards.append(card)
    return cards


# --- writing -------------------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse}td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.ctx{font-family:monospace;white-space:pre-wrap;line-height:1.7}
.tok{border-right:1px dotted #ccc}.hi{background:#ffb347;font-weight:bold}.act{color:#888;font-size:.85em}
.vocab span{display:inline-block;font-family:monospace;background:#e8f0fe;margin:.15em;padding:0 .3em}"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def _show(token: str) -> str:
    return html.escape(token.replace("\n", "\u21b5"))


def feature_page(name: str, card: dict[str, Any]) -> str:
    rows = []
    for c in card["contexts"]:
        toks = "".join(
            f"<span class='tok{' hi' if i == c['highlight'] else ''}'>{_show(t)}</span>" for i, t in enumerate(c["tokens"]))
        rows.append(f"<tr><td>{c['activation']:.3f}</td><td class='l ctx'>{toks}</td>"
                    f"<td class='act'>seq {c['seq']} pos {c['pos']}</td></tr>")
    vocab = ""
    if "vocab" in card:
        vocab = "<h2>Promoted tokens</h2><div class='vocab'>" + "".join(
            f"<span title='logit {v['logit']:.2f}'>{_show(v['token'])}</span>" for v in card["vocab"]) + "</div>"
    body = (f"<p><a href='../index.html'>&larr; {html.escape(name)}</a></p><h1>Feature {_title(card)}</h1>"
            f"<p>firing frequency {card['frequency']:.3g} &middot; mean activation {card['mean_activation']:.3g} "
            f"&middot; max activation {card['max_activation']:.3g}</p>{vocab}<h2>Top activating contexts</h2>"
            "<table><tr><th>activation</th><th class='l'>context (highlighted: the activating token)</th><th></th></tr>"
            + "".join(rows) + "</table>")
    return _page(f"{name} feature {card['index']}", body)


def _title(card: dict[str, Any]) -> str:
    """"12", or "12 (latent 4 of mlp_in.2)" for a decomposer over several sites."""
    if "site" not in card:
        return str(card["index"])
    return f"{card['index']} (latent {card['latent']} of {html.escape(card['site'])})"


def index_page(name: str, meta: dict[str, Any], cards: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td class='l'><a href='features/{c['index']}.html'>{_title(c)}</a></td><td>{c['frequency']:.3g}</td>"
        f"<td>{c['mean_activation']:.3g}</td><td>{c['max_activation']:.3g}</td>"
        f"<td class='l ctx'>{_show(''.join(c['contexts'][0]['tokens'])) if c['contexts'] else ''}</td>"
        f"<td class='l ctx'>{_show(' '.join(v['token'].strip() for v in c.get('vocab', [])[:5]))}</td></tr>"
        for c in cards)
    desc = ", ".join(f"{k} {html.escape(str(v))}" for k, v in meta.items())
    body = (f"<h1>Feature cards: {html.escape(name)}</h1><p>{desc}</p><p>{len(cards)} features shown (a seeded sample "
            "of the live ones); features.json has every feature's statistics.</p>"
            "<table><tr><th class='l'>feature</th><th>frequency</th><th>mean act</th><th>max act</th>"
            "<th class='l'>top context</th><th class='l'>promoted tokens</th></tr>" + rows + "</table>")
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
