"""Constructed decomposers with known answers, for the evaluation-suite tests (not registered kinds)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dictlearn.decomposers.base import REGISTRY, Decomposer, DecomposerConfig


class SplitIdentity(Decomposer):
    """codes = scale * [relu(x), relu(-x)], decode = (pos - neg) / scale * gain: with gain 1, decode(encode(x)) == x exactly."""

    kind = "test_split_identity"

    def __init__(self, d: int, hookpoint: str = "resid_post.0", scale: float = 1.0, gain: float = 1.0):
        self.config = DecomposerConfig(d_in=d, n_features=2 * d, hookpoint_in=hookpoint)
        self.scale, self.gain = scale, gain

    def encode(self, x):
        return self.scale * jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)

    def decode(self, codes):
        d = self.config.d_in
        return (codes[..., :d] - codes[..., d:]) * (self.gain / self.scale)

    def features(self):
        eye = jnp.eye(self.config.d_in)
        return jnp.concatenate([eye, -eye]) * self.gain


class AllZero(Decomposer):
    """Encodes everything to no active feature and decodes to zero: the ablation baseline."""

    kind = "test_all_zero"

    def __init__(self, d_in: int, n_features: int, d_out: int | None = None, hookpoint_in: str = "resid_post.0",
                 hookpoint_out: str = ""):
        self.config = DecomposerConfig(d_in=d_in, n_features=n_features, d_out=d_out, hookpoint_in=hookpoint_in,
                                       hookpoint_out=hookpoint_out)

    def encode(self, x):
        return jnp.zeros(x.shape[:-1] + (self.config.n_features,), x.dtype)

    def decode(self, codes):
        return jnp.zeros(codes.shape[:-1] + (self.config.d_out,), codes.dtype)

    def features(self):
        return jnp.zeros((self.config.n_features, self.config.d_out))


class LinearReLU(Decomposer):
    """codes = relu(x W_enc + b_enc), out = codes W_dec + b_dec, with weights given (a known transcoder/SAE)."""

    kind = "test_linear_relu"

    def __init__(self, w_enc, b_enc, w_dec, b_dec, hookpoint_in: str = "resid_post.0", hookpoint_out: str = ""):
        w_enc, w_dec = np.asarray(w_enc, np.float32), np.asarray(w_dec, np.float32)
        self.config = DecomposerConfig(d_in=w_enc.shape[0], n_features=w_enc.shape[1], d_out=w_dec.shape[1],
                                       hookpoint_in=hookpoint_in, hookpoint_out=hookpoint_out)
        self.w_enc, self.b_enc = nnx.Param(jnp.asarray(w_enc)), nnx.Param(jnp.asarray(b_enc, jnp.float32))
        self.w_dec, self.b_dec = nnx.Param(jnp.asarray(w_dec)), nnx.Param(jnp.asarray(b_dec, jnp.float32))

    def encode(self, x):
        return jax.nn.relu(x @ self.w_enc[...] + self.b_enc[...])

    def decode(self, codes):
        return codes @ self.w_dec[...] + self.b_dec[...]

    def features(self):
        return self.w_dec[...]


class SavedLinear(Decomposer):
    """A loadable kind (build/save/load round trip) for end-to-end runs of the suite: relu(x W_enc + b) W_dec.

    Not registered at import: tests register it only while they need it (`registered_saved_linear`), so
    code that walks the registry (export, configs) never meets it."""

    kind = "test_saved_linear"

    def __init__(self, config: DecomposerConfig, *, rngs: nnx.Rngs):
        self.config = config
        k1, k2 = rngs.params(), rngs.params()
        self.W_enc = nnx.Param(jax.random.normal(k1, (config.d_in, config.n_features)) / np.sqrt(config.d_in))
        self.b_enc = nnx.Param(jnp.zeros((config.n_features,)))
        self.W_dec = nnx.Param(jax.random.normal(k2, (config.n_features, config.d_out)) / np.sqrt(config.n_features))

    def encode(self, x):
        return jax.nn.relu(x @ self.W_enc[...] + self.b_enc[...])

    def decode(self, codes):
        return codes @ self.W_dec[...]

    def features(self):
        return self.W_dec[...]


@contextlib.contextmanager
def registered_saved_linear():
    REGISTRY[SavedLinear.kind] = SavedLinear
    try:
        yield SavedLinear
    finally:
        REGISTRY.pop(SavedLinear.kind, None)
