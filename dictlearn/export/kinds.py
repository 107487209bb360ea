"""The one place that knows dictlearn's parameter names: decomposer <-> LinearDictionary.

dictlearn's SAEs and transcoders (dictlearn/decomposers/sae.py) store W_enc (n, d_in), W_dec (n, d_out),
b_enc, b_dec, an input bias (b_dec itself for an SAE, b_in for a transcoder) and W_skip (d_in, d_out).
How codes are chosen at inference is the sparsity mechanism's answer (`Sparsity.linear_form`): e.g.
batchtopk reads as jumprelu with its global threshold on every latent, gtopk as topk (its encoding
without gradients). So any kind built on SparseCoder, a new one included, converts with no edit here.
An SAE whose input bias is not its decoder bias is written with that bias folded into b_enc.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

import dictlearn.decomposers  # noqa: F401  (registers every kind)
from dictlearn.decomposers import base
from dictlearn.export.linear import LinearDictionary

_SAE_KIND = {"relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}  # a LinearDictionary's sparsity -> SAE kind
_TINY = float(np.finfo(np.float32).tiny)


class UnsupportedKindError(ValueError):
    """A decomposer that is not an affine encoder/decoder (e.g. semi-NMF)."""


def _np(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def to_linear(module: base.Decomposer) -> LinearDictionary:
    """The affine dictionary a dictlearn SAE or transcoder computes at inference."""
    form = module.sparsity.linear_form(module) if module.export_format == "linear" else None
    if form is None:
        raise UnsupportedKindError(f"decomposer kind {module.kind!r} has no affine (SAELens/sparsify) form "
                                   f"(its export format: {module.export_format or 'none'!r})")
    sparsity, threshold, k = form
    cfg = module.config
    return LinearDictionary(
        sparsity=sparsity,
        W_enc=_np(module.W_enc[...]).T,
        b_enc=_np(module.b_enc[...]),
        W_dec=_np(module.W_dec[...]),
        b_dec=_np(module.b_dec[...]),
        b_pre=_np(module.input_bias()),
        threshold=None if threshold is None else _np(threshold),
        k=k,
        W_skip=_np(module.W_skip[...]).T if module.skip else None,
        hookpoint_in=cfg.hookpoint_in,
        hookpoint_out=cfg.hookpoint_out,
    )


def _unit_rows(w: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-4))


def from_linear(lin: LinearDictionary, seed: int = 0) -> base.Decomposer:
    """A dictlearn decomposer (relu / topk / jumprelu SAE, or a (skip) transcoder) computing `lin`."""
    common = dict(d_in=lin.d_in, n_features=lin.n_features, d_out=lin.d_out, hookpoint_in=lin.hookpoint_in,
                  hookpoint_out=lin.hookpoint_out, seed=seed, normalize_decoder=_unit_rows(lin.W_dec))
    if lin.sparsity == "topk":
        common["k"] = int(lin.k)
    if lin.is_transcoder:
        kind = "skip_transcoder" if lin.W_skip is not None else "transcoder"
        module = base.build(kind, {**common, "sparsity": lin.sparsity})
        module.b_in[...] = jnp.asarray(lin.b_pre if lin.b_pre is not None else np.zeros(lin.d_in, np.float32))
        b_enc = lin.b_enc
        if lin.W_skip is not None:
            module.W_skip[...] = jnp.asarray(lin.W_skip.T)
    else:
        module = base.build(_SAE_KIND[lin.sparsity], common)
        b_enc = lin.b_enc
        if lin.b_pre is None or not np.array_equal(lin.b_pre, lin.b_dec):
            # dictlearn SAEs centre the input with b_dec: (x - b_dec) W + b_enc' == (x - b_pre) W + b_enc
            b_pre = lin.b_pre if lin.b_pre is not None else np.zeros(lin.d_in, np.float32)
            b_enc = (b_enc.astype(np.float64) + (lin.b_dec.astype(np.float64) - b_pre) @ lin.W_enc).astype(np.float32)
    module.W_enc[...] = jnp.asarray(lin.W_enc.T)
    module.b_enc[...] = jnp.asarray(b_enc)
    module.W_dec[...] = jnp.asarray(lin.W_dec)
    module.b_dec[...] = jnp.asarray(lin.b_dec)
    if lin.sparsity == "jumprelu":
        # dictlearn keeps log-thresholds, so thresholds must be positive; a threshold <= 0 acts like
        # ReLU (relu(pre) * (pre > t) == relu(pre)), which the smallest positive float reproduces.
        module.sparsity.log_threshold[...] = jnp.log(jnp.asarray(np.maximum(lin.threshold, _TINY)))
    return module
