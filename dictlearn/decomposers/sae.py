"""The encoder/decoder core shared by every sparse autoencoder and transcoder.

A `SparseCoder` owns the weights and the reconstruction; a `Sparsity` module (TopK, BatchTopK,
JumpReLU, ReLU+L1, gradient TopK) decides which latents fire and adds its own penalty. An SAE is a
SparseCoder whose input bias is its decoder bias; a transcoder has a separate input bias and,
optionally, a linear skip path.

Shapes (row-major by latent, so sparse kernels move whole rows):
  W_enc (n_features, d_in)    pre = z0 + b_enc,  z0 = (x - b_in) @ W_enc.T
  W_dec (n_features, d_out)   y_hat = codes @ W_dec + b_dec [+ x @ W_skip]

Mechanisms receive z0, the encoder product without its bias: the TopK family selects on z0 + b_enc
without ever writing that (B, n) sum to memory (two full passes saved per step); dense mechanisms
call `coder.biased(z0)`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from dictlearn.decomposers.base import Decomposer, DecomposerConfig
from dictlearn.decomposers.sparse_ops import SparseCodes, densify, fired_mask, gather_decode, gather_encode
from dictlearn.kernels import cpu as cpu_kernels

Codes = SparseCodes | jax.Array  # fixed-slot sparse codes, or dense (B, n_features)
DEAD_CAP = 2**30  # tokens_since_fired saturates here (int32)


class Buffer(nnx.Variable):
    """Training state saved with the module but never optimised (counters, running thresholds)."""


@dataclasses.dataclass
class SparseCoderConfig(DecomposerConfig):
    """Fields every SAE and transcoder shares. What depends on the sparsity mechanism (validation, the
    encoder's starting norm, whether batches need gradients) is asked of the mechanism's class."""

    # The Sparsity class an SAE kind's config uses; a transcoder picks one by name (`mechanism()`).
    mechanism_cls: ClassVar[type[Sparsity] | None] = None

    normalize_decoder: bool = True  # keep decoder rows at unit norm (gradient projection + renormalisation)
    median_iters: int = 16  # Weiszfeld iterations for the decoder-bias initialisation (0: the mean)
    # Norm of the encoder's rows at initialisation (the decoder's rows are unit norm); None: the sparsity
    # mechanism's default (`Sparsity.encoder_init_norm`), filled in here so saved configs record it.
    encoder_init_norm: float | None = None
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing (dead_frac; TopK's AuxK)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.median_iters >= 0, f"median_iters must be >= 0, got {self.median_iters}")
        check(0 < self.dead_tokens < DEAD_CAP, f"dead_tokens must be in 1..{DEAD_CAP - 1}, got {self.dead_tokens}")
        mechanism = self.mechanism()
        if self.encoder_init_norm is None:
            self.encoder_init_norm = mechanism.encoder_init_norm
        check(self.encoder_init_norm > 0, f"encoder_init_norm must be positive, got {self.encoder_init_norm}")
        mechanism.check_config(self)
        self.validate()

    def mechanism(self) -> type[Sparsity]:
        """The Sparsity class this config trains with."""
        if self.mechanism_cls is None:
            raise TypeError(f"{type(self).__name__} must set `mechanism_cls` (or override mechanism())")
        return self.mechanism_cls

    @property
    def needs_grad(self) -> bool:
        return self.mechanism().needs_grad

    def sparsity_target(self) -> float | None:
        return self.mechanism().l0_target(self)

    def validate(self) -> None:
        """Checks beyond the mechanism's own (`Sparsity.check_config`); subclasses extend it."""


def check(cond: bool, message: str) -> None:
    """Config validation: raise ValueError(message) unless cond."""
    if not cond:
        raise ValueError(message)


def geometric_median(points: jax.Array, iters: int, eps: float = 1e-8) -> jax.Array:
    """Weiszfeld's iteration from the mean: a robust centre for the decoder bias."""
    points = points.astype(jnp.float32)

    def step(_, z):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(points - z, axis=1), eps)
        return (w[:, None] * points).sum(0) / w.sum()

    return jax.lax.fori_loop(0, iters, step, points.mean(0))


def unit_rows(key: jax.Array, n: int, d: int) -> jax.Array:
    w = jax.random.normal(key, (n, d), jnp.float32)
    return w / jnp.linalg.norm(w, axis=1, keepdims=True)


class Sparsity(nnx.Module):
    """How pre-activations become codes. One subclass per mechanism; it may hold its own state.

    Every method gets the raw input x and z0 = (x - b_in) @ W_enc.T (the pre-activation without b_enc)."""

    name: ClassVar[str] = ""  # what a transcoder's `sparsity` field calls it
    needs_grad: ClassVar[bool] = False  # True: selection uses "grad" (the loss gradient at hookpoint_out)
    # With Adam the encoder's starting norm sets how fast it moves relative to its size; penalty-based
    # mechanisms (ReLU + L1, JumpReLU + L0) keep 1, the TopK family overrides it.
    encoder_init_norm: ClassVar[float] = 1.0
    fields: ClassVar[tuple[type, ...]] = ()  # the dataclass mixins holding this mechanism's config fields

    @classmethod
    def check_config(cls, config: SparseCoderConfig) -> None:
        """Raise ValueError naming a bad value of this mechanism's fields."""

    @classmethod
    def l0_target(cls, config: SparseCoderConfig) -> float | None:
        """The L0 this mechanism's fields aim at (None: no target)."""
        return None

    def linear_form(self, coder: SparseCoder) -> tuple[str, jax.Array | None, int | None] | None:
        """The inference rule as an affine dictionary's: ("relu" | "topk" | "jumprelu", per-latent threshold
        or None, k or None); None when it has none (then no SAELens/sparsify export)."""
        return None

    def train_codes(self, coder: SparseCoder, x: jax.Array, z0: jax.Array, batch: dict[str, jax.Array]) -> Codes:
        """Codes used by the training loss (may depend on the whole batch)."""
        raise NotImplementedError

    def infer_codes(self, coder: SparseCoder, x: jax.Array, z0: jax.Array, grad: jax.Array | None) -> Codes:
        """Codes for one token at a time, independent of the rest of the batch."""
        raise NotImplementedError

    def train_forward(self, coder: SparseCoder, x: jax.Array, z0: jax.Array,
                      batch: dict[str, jax.Array]) -> tuple[jax.Array, Codes | None, dict[str, jax.Array]]:
        """Training reconstruction: (y_hat, codes or None, {"l0", "fired", ...})."""
        codes = self.train_codes(coder, x, z0, batch)
        return coder.reconstruct(codes, x), codes, code_stats(codes, coder.config.n_features)

    def penalty(self, coder: SparseCoder, x: jax.Array, z0: jax.Array, codes: Codes | None,
                err: jax.Array, optional: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Extra loss terms (L1, L0, AuxK) and their metrics; err = y_hat - y. With optional=False, leave
        out the term `optional_term_needed` gates (same metric keys, its value 0)."""
        return jnp.zeros((), jnp.float32), {}

    def optional_term_needed(self, coder: SparseCoder) -> jax.Array | None:
        """A traced bool: does this step need the penalty's optional term (AuxK: is any latent dead)?
        The training step then differentiates the loss under lax.cond, so steps without it pay nothing
        for it, not even zero gradients. None: there is no such term."""
        return None

    def init_from_data(self, coder: SparseCoder, x: jax.Array, y: jax.Array) -> None:
        """Data-dependent start of the mechanism's own state (after the coder's biases are set)."""

    def after_step(self, metrics: dict[str, jax.Array]) -> None:
        """Update the mechanism's own state after an optimiser step."""

    def fold(self, code_scale: float) -> None:
        """Codes are about to be multiplied by code_scale: rescale thresholds to match."""


def code_stats(codes: Codes, n_features: int) -> dict[str, jax.Array]:
    """Mean active latents per token, and which latents fired in the batch."""
    if isinstance(codes, SparseCodes):
        return {"l0": jnp.mean(jnp.sum(codes.values != 0, axis=-1).astype(jnp.float32)),
                "fired": fired_mask(codes, n_features)}
    return {"l0": jnp.mean(jnp.sum(codes != 0, axis=-1).astype(jnp.float32)), "fired": jnp.any(codes != 0, axis=0)}


def select_codes(coder: SparseCoder, x: jax.Array, z0: jax.Array, indices: jax.Array) -> SparseCodes:
    """relu(pre-activation) at the chosen latents, with the sparse-backward encoder VJP."""
    vals = gather_encode(x.astype(jnp.float32), coder.input_bias(), coder.W_enc[...], coder.b_enc[...],
                         jax.lax.stop_gradient(z0), indices)
    return SparseCodes(jax.nn.relu(vals), indices)


class SparseCoder(Decomposer):
    """Weights, reconstruction, training hooks and scale folding shared by SAEs and transcoders."""

    config_cls: ClassVar[type[DecomposerConfig]] = SparseCoderConfig
    export_format: ClassVar[str] = "linear"  # export.kinds.to_linear asks self.sparsity.linear_form
    transcoder: ClassVar[bool] = False  # separate input bias b_in (else the input is centred by b_dec)
    skip: ClassVar[bool] = False  # linear skip path W_skip (d_in, d_out), initialised at zero

    def __init__(self, config: SparseCoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        n, d_in, d_out = config.n_features, config.d_in, config.d_out
        w_dec = unit_rows(rngs.params(), n, d_out)
        self.W_dec = nnx.Param(w_dec)
        # Encoder = decoder transpose where the spaces match (an SAE); independent rows otherwise; rows of
        # norm encoder_init_norm either way.
        w_enc = w_dec if (d_in == d_out and not self.transcoder) else unit_rows(rngs.params(), n, d_in)
        self.W_enc = nnx.Param(config.encoder_init_norm * w_enc)
        self.b_enc = nnx.Param(jnp.zeros((n,), jnp.float32))
        self.b_dec = nnx.Param(jnp.zeros((d_out,), jnp.float32))
        if self.transcoder:
            self.b_in = nnx.Param(jnp.zeros((d_in,), jnp.float32))
        if self.skip:
            self.W_skip = nnx.Param(jnp.zeros((d_in, d_out), jnp.float32))
        # Tokens seen since each latent last fired (saturates at DEAD_CAP): the one dead-latent counter.
        self.tokens_since_fired = Buffer(jnp.zeros((n,), jnp.int32))
        self.sparsity = self.make_sparsity(config)

    def make_sparsity(self, config: SparseCoderConfig) -> Sparsity:
        return config.mechanism()(config)

    def dead_mask(self) -> jax.Array:
        """(n_features,) bool: latents that have not fired for `dead_tokens` tokens."""
        return self.tokens_since_fired[...] >= self.config.dead_tokens

    # ---- the pieces -------------------------------------------------------------------------
    def input_bias(self) -> jax.Array:
        return self.b_in[...] if self.transcoder else self.b_dec[...]

    def encoder_product(self, x: jax.Array) -> jax.Array:
        """z0 = (x - b_in) @ W_enc.T: the pre-activations of raw inputs without b_enc, (B, n)."""
        return cpu_kernels.matmul_nt(x.astype(jnp.float32) - self.input_bias(), self.W_enc[...])

    def biased(self, z0: jax.Array) -> jax.Array:
        return z0 + self.b_enc[...]

    def preacts(self, x: jax.Array) -> jax.Array:
        """Dense pre-activations (B, n) of raw inputs."""
        return self.biased(self.encoder_product(x))

    def reconstruct(self, codes: Codes, x: jax.Array | None) -> jax.Array:
        """Decoder output for codes; the skip path needs the raw input x."""
        if isinstance(codes, SparseCodes):
            # Sparse codes come from select_codes: a zero value is a relu's or a selection mask's (no gradient).
            y = gather_decode(codes.values, codes.indices, self.W_dec[...], zero_is_unselected=True)
        else:
            y = codes @ self.W_dec[...]
        y = y + self.b_dec[...]
        if self.skip and x is not None:
            y = y + x.astype(jnp.float32) @ self.W_skip[...]
        return y

    def dense(self, codes: Codes) -> jax.Array:
        return densify(codes, self.config.n_features) if isinstance(codes, SparseCodes) else codes

    # ---- protocol -----------------------------------------------------------------------------
    def encode(self, x: jax.Array) -> jax.Array:
        return self.dense(self.sparsity.infer_codes(self, x, self.encoder_product(x), None))

    def decode(self, codes: jax.Array) -> jax.Array:
        """Dense codes -> output. For a skip transcoder this excludes the skip path (it needs x): use __call__."""
        return self.reconstruct(codes, None)

    def __call__(self, x: jax.Array, grad: jax.Array | None = None) -> jax.Array:
        """Reconstruction of raw inputs (sparse decode for the TopK family, skip path included)."""
        return self.reconstruct(self.sparsity.infer_codes(self, x, self.encoder_product(x), grad), x)

    def loss(self, batch: dict[str, jax.Array], optional: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, y = batch["x"], batch["y"].astype(jnp.float32)
        z0 = self.encoder_product(x)
        y_hat, codes, stats = self.sparsity.train_forward(self, x, z0, batch)
        err = y_hat - y
        mse = jnp.mean(jnp.sum(err**2, axis=-1))
        total_var = jnp.mean(jnp.sum((y - y.mean(0)) ** 2, axis=-1))
        penalty, extra = self.sparsity.penalty(self, x, z0, codes, err, optional)
        metrics = {
            "mse": mse,
            "fvu": mse / jnp.maximum(total_var, 1e-12),
            "n_tokens": jnp.asarray(x.shape[0], jnp.float32),
            "dead_frac": jnp.mean(self.dead_mask().astype(jnp.float32)),
            **stats,
            **extra,
        }
        return mse + penalty, metrics

    def features(self) -> jax.Array:
        return self.W_dec[...]

    def loss_and_grads(self, batch):
        needed = self.sparsity.optional_term_needed(self)
        if needed is None:
            return super().loss_and_grads(batch)
        graphdef, state = nnx.split(self)

        def version(optional: bool):
            def run(state):
                coder = nnx.merge(graphdef, state)
                return nnx.value_and_grad(lambda m: m.loss(batch, optional), has_aux=True)(coder)
            return run

        return jax.lax.cond(needed, version(True), version(False), state)

    # ---- training hooks -----------------------------------------------------------------------
    def init_from_data(self, x: jax.Array, y: jax.Array) -> None:
        """Output bias at the geometric median of y (input bias, for transcoders, at that of x), then the
        mechanism's own start (e.g. thresholds that meet a target L0)."""
        self.b_dec[...] = geometric_median(y, self.config.median_iters)
        if self.transcoder:
            self.b_in[...] = geometric_median(x, self.config.median_iters)
        self.sparsity.init_from_data(self, x, y)

    def project_grads(self, grads: nnx.State) -> nnx.State:
        """Remove the gradient component parallel to each decoder row (it would only change its norm)."""
        if not self.config.normalize_decoder:
            return grads
        # Rows are unit norm here (initialised so, renormalised after every step), so <g, w> w is the
        # parallel part; skipping the division by |w|^2 saves a pass over the decoder.
        w, g = self.W_dec[...], grads["W_dec"][...]
        grads["W_dec"] = grads["W_dec"].replace(g - cpu_kernels.row_dots(g, w)[:, None] * w)
        return grads

    def after_step(self, metrics: dict[str, jax.Array]) -> None:
        seen = jnp.minimum(self.tokens_since_fired[...] + metrics["n_tokens"].astype(jnp.int32), DEAD_CAP)
        self.tokens_since_fired[...] = jnp.where(metrics["fired"], 0, seen)
        if self.config.normalize_decoder:
            w = self.W_dec[...]
            self.W_dec[...] = w / jnp.maximum(jnp.sqrt(cpu_kernels.row_dots(w, w)), 1e-12)[:, None]
        self.sparsity.after_step(metrics)

    def fold_input_scale(self, scale_in: float, scale_out: float) -> None:
        """Trained on (scale_in * x -> scale_out * y); afterwards reads raw x and writes raw y.

        Decoder rows keep their norm; codes are divided by scale_out (so a code is the length of a
        feature's contribution in raw units), and thresholds follow. Exact for every kind;
        fold_input_scale(1/scale_in, 1/scale_out) undoes it. Hyper-parameters (L1/L0/AuxK
        coefficients) keep the units of the training scale."""
        s_in, s_out = float(scale_in), float(scale_out)
        if not (s_in > 0 and s_out > 0):
            raise ValueError(f"fold_input_scale needs positive scales, got {scale_in}, {scale_out}")
        c = 1.0 / s_out
        w_enc, b_enc = self.W_enc[...], self.b_enc[...]
        if not self.transcoder:
            # The SAE centres its input with b_dec, which lives in output units: absorb the mismatch in b_enc.
            b_enc = b_enc + (s_in / s_out - 1.0) * (w_enc @ self.b_dec[...])
        else:
            self.b_in[...] = self.b_in[...] / s_in
        self.W_enc[...] = w_enc * (s_in * c)
        self.b_enc[...] = b_enc * c
        self.b_dec[...] = self.b_dec[...] * c
        if self.skip:
            self.W_skip[...] = self.W_skip[...] * (s_in * c)
        self.sparsity.fold(c)
