"""A decomposer's side of steering: where its features steer, what they say in the vocabulary, how strongly
they fire (from the cache or the labelled windows), and which one detects each concept."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dictlearn.activations.families import HookpointError, unembed_directions
from dictlearn.activations.hookpoints import Hookpoint, resolve
from dictlearn.eval.steering.records import Detection
from dictlearn.eval.steering.stats import detection_auc


def steering_site(model: torch.nn.Module, decomposer: Any) -> tuple[Hookpoint, np.ndarray]:
    """Where a decomposer steers and its (n_features, width) directions there: the rows of `features()` at
    `hookpoint_out`, for every kind (adding alpha * f_k at an MLP hidden site is adding alpha * f_k W_out to
    the MLP's output)."""
    hp = resolve(model, decomposer.config.hookpoint_out)[0]
    dirs = np.array(decomposer.features(), np.float32)
    if dirs.ndim != 2 or dirs.shape[1] != hp.width:
        raise ValueError(f"steering directions of shape {dirs.shape} do not fit hookpoint {hp.name} (width {hp.width})")
    return hp, dirs


def vocab_projections(model: torch.nn.Module, hookpoint: str, directions: np.ndarray) -> np.ndarray | None:
    """(n, vocab) logit-lens projections of directions written at `hookpoint` (through the family's output
    projection and norm gains); None when they do not reach the logits linearly."""
    try:
        return unembed_directions(model, hookpoint, np.atleast_2d(directions))
    except HookpointError:
        return None


def encode_np(decomposer: Any, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """decomposer.encode on a numpy array, in batches, as float32 numpy."""
    import jax.numpy as jnp

    if len(x) == 0:
        return np.zeros((0, decomposer.config.n_features), np.float32)
    return np.concatenate([np.asarray(decomposer.encode(jnp.asarray(x[i: i + batch])), np.float32)
                           for i in range(0, len(x), batch)])


def pooled_codes(decomposer: Any, token_acts: list[np.ndarray], cols: np.ndarray | None = None,
                 chunk_rows: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence mean code (N, F or len(cols)), plus per-feature max code and firing count over all tokens."""
    n_feat = decomposer.config.n_features
    width = n_feat if cols is None else len(cols)
    means = np.zeros((len(token_acts), width), np.float32)
    fmax, fired = np.zeros(n_feat, np.float32), np.zeros(n_feat, np.int64)
    i = 0
    while i < len(token_acts):
        j, rows = i, 0
        while j < len(token_acts) and (rows == 0 or rows + len(token_acts[j]) <= chunk_rows):
            rows += len(token_acts[j])
            j += 1
        codes = encode_np(decomposer, np.concatenate(token_acts[i:j]))
        fmax = np.maximum(fmax, codes.max(0))
        fired += (codes > 0).sum(0)
        sel = codes if cols is None else codes[:, cols]
        offs = np.cumsum([0] + [len(a) for a in token_acts[i:j]])
        for k in range(j - i):
            means[i + k] = sel[offs[k]: offs[k + 1]].mean(0)
        i = j
    return means, fmax, fired


def window_max_codes(decomposer: Any, token_acts: list[np.ndarray], cols: np.ndarray, chunk: int = 64) -> np.ndarray:
    """(N, len(cols)) each chosen feature's largest code in each window (a window's "activation", as in
    top-activating contexts); encoded `chunk` windows at a time."""
    out = np.zeros((len(token_acts), len(cols)), np.float32)
    if not len(cols):
        return out
    for i in range(0, len(token_acts), chunk):
        part = token_acts[i: i + chunk]
        codes = encode_np(decomposer, np.concatenate(part))[:, cols]
        offs = np.cumsum([0] + [len(a) for a in part])
        for j, (a, b) in enumerate(zip(offs[:-1], offs[1:])):
            if b > a:
                out[i + j] = codes[a:b].max(0)
    return out


def cache_feature_stats(decomposer: Any, cache: Any, max_rows: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(max activation, firing count, rows read) per feature over up to max_rows rows of the cache's eval
    shards (all shards if it has none); None when the cache lacks the decomposer's input hookpoint."""
    from dictlearn.activations.cache import to_float32

    hp = decomposer.config.hookpoint_in
    if hp not in getattr(cache, "hookpoints", {}):
        return None
    n_feat = decomposer.config.n_features
    fmax, fired, n = np.zeros(n_feat, np.float32), np.zeros(n_feat, np.int64), 0
    for sid in cache.shard_ids("eval") or cache.shard_ids("all"):
        x = to_float32(np.asarray(cache.shard_arrays(sid, keys=[hp])[hp][: max_rows - n]))
        if len(x):
            _, m, f = pooled_codes(decomposer, [x], np.zeros(0, int))
            fmax, fired, n = np.maximum(fmax, m), fired + f, n + len(x)
        if n >= max_rows:
            break
    return (fmax, fired, n) if n > 0 else None


def token_feature_stats(decomposer: Any, token_acts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """(max activation, firing count, tokens read) per feature over per-window activations."""
    _, fmax, fired = pooled_codes(decomposer, token_acts, np.zeros(0, int))
    return fmax, fired, int(sum(len(t) for t in token_acts))


def best_feature_per_concept(decomposer: Any, train_tokens: list[np.ndarray], train_labels: np.ndarray,
                             test_tokens: list[np.ndarray], test_labels: np.ndarray, concepts: list[str],
                             live: np.ndarray) -> dict[str, Detection]:
    """Per concept: the live feature whose mean code over a window best detects the concept on training
    windows (ROC AUC), and that feature's AUC on held-out windows (chosen on one split, scored on another)."""
    train_codes = pooled_codes(decomposer, train_tokens)[0]
    test_codes = pooled_codes(decomposer, test_tokens)[0]
    out = {}
    live = np.asarray(live, int)
    for c in concepts:
        if len(live) == 0:  # nothing fires: no feature to steer with
            out[c] = Detection(None, None, None)
            continue
        auc = detection_auc(train_codes[:, live], np.asarray(train_labels) == c)
        f = int(live[np.argmax(auc)])
        out[c] = Detection(f, float(auc.max()), float(detection_auc(test_codes[:, f], np.asarray(test_labels) == c)[0]))
    return out
