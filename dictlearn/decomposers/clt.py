"""Cross-layer transcoder (Ameisen et al. / Lindsey et al. 2025, "Circuit Tracing"), kind "clt".

One encoder per layer l reads that layer's MLP input (site l of `hookpoint_in`, e.g. `mlp_in.0-3`); the
latents of layer i write, through their own decoder, to every layer j >= i, so the reconstruction of
output site j (`mlp_out.j`) sums the contributions of layers 0..j:

  pre_l   = (x_l - b_in[l]) @ W_enc[l] + b_enc[l]                (B, F) for each layer l
  codes_l = sparsity(pre_l)                                       TopK per layer, BatchTopK or JumpReLU
  y_hat_j = sum_{i <= j} codes_i @ W_dec_i[:, j - i] + b_dec[j]

Shapes (the names are what exporters read): W_enc (L, d_in, F), b_enc (L, F), b_in (L, d_in),
W_dec_{i} (F, L - i, d_out) for source layer i, b_dec (L, d_out); F = n_features latents per layer. Batches
carry a site axis: x (B, L, d_in), y (B, L, d_out); codes are (B, L, F).

The loss is the squared error summed over output layers (each site scaled to unit mean squared norm by
the trainer), plus the mechanism's own term: AuxK over dead latents (TopK, BatchTopK: the dead latents of
every layer, through their cross-layer decoders, reconstruct the detached residual of every layer) or
the straight-through L0 penalty (JumpReLU, the active latents of a row over all layers). Each latent's
decoder (all the layers it writes to, as one vector) is kept at unit norm in training.

Selection and validation reuse the SAE mechanisms: the config's `sparsity` names one of the transcoder's
Sparsity classes, whose field mixins, checks and encoder starting norm apply as they are; the per-layer
arithmetic (top-k per row and layer, the per-layer batch threshold, the JumpReLU straight-through
functions) comes from those kinds' modules. The step is dense in the latents (B x L x F pre-activations
and codes), which suits a CLT over a few layers at moderate width; see docs/training.md for memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dictlearn.decomposers.base import Decomposer, DecomposerConfig, register
from dictlearn.decomposers.batchtopk import kth_largest_nonneg
from dictlearn.decomposers.coefficient import START_ROWS, penalty_coefficient, warmup
from dictlearn.decomposers.jumprelu import MIN_THRESHOLD, heaviside, jumprelu
from dictlearn.decomposers.sae import DEAD_CAP, Buffer, SparseCoderConfig, Sparsity, check, geometric_median
from dictlearn.decomposers.sparse_ops import top_k
from dictlearn.decomposers.transcoder import SPARSITIES
from dictlearn.hookpoint_names import expand_hookpoints

CLT_SPARSITIES = ("topk", "batchtopk", "jumprelu")
# The field mixins of those mechanisms, each once, in that order (as the transcoder's config gathers them).
_FIELD_MIXINS = tuple(reversed(dict.fromkeys(f for name in CLT_SPARSITIES for f in reversed(SPARSITIES[name].fields))))


@dataclasses.dataclass
class CLTConfig(*_FIELD_MIXINS, SparseCoderConfig):
    """A cross-layer transcoder: `hookpoint_in`/`hookpoint_out` are layer ranges of equal length (mlp_in.0-3,
    mlp_out.0-3); `n_features` (or `expansion`) counts latents per layer; only the fields of the chosen
    `sparsity` are used (k per layer for topk, AuxK's for topk and batchtopk; a JumpReLU clt's target_l0 counts
    active latents per row and layer)."""

    sparsity: str = "topk"  # topk (k latents per row and layer) | batchtopk (k per row and layer on average) | jumprelu

    def mechanism(self) -> type[Sparsity]:
        check(self.sparsity in CLT_SPARSITIES,
              f"a clt's sparsity must be one of {', '.join(CLT_SPARSITIES)}, got {self.sparsity!r}")
        return SPARSITIES[self.sparsity]

    def validate(self) -> None:
        check(bool(self.hookpoint_in), "a clt needs hookpoint_in naming its layers as a range, e.g. \"mlp_in.0-3\" "
              "(and hookpoint_out, e.g. \"mlp_out.0-3\")")
        sites_in, sites_out = self.hookpoints_in(), self.hookpoints_out()
        check(len(sites_in) == len(sites_out),
              f"a clt reads and writes the same number of layers: hookpoint_in {self.hookpoint_in!r} names "
              f"{len(sites_in)}, hookpoint_out {self.hookpoint_out!r} names {len(sites_out)}; give ranges of one length")
        check(self.row_slots is None, "row_slots does not apply to a clt (its BatchTopK is computed exactly per "
              "layer); leave it out")

    def hookpoints_in(self) -> list[str]:
        return expand_hookpoints(self.hookpoint_in)

    def hookpoints_out(self) -> list[str]:
        return expand_hookpoints(self.hookpoint_out)

    @property
    def n_layers(self) -> int:
        return len(self.hookpoints_in())

    def sparsity_target(self) -> float | None:
        """The mechanism's target counts latents per row and layer; the eval's L0 counts every layer's."""
        per_layer = self.mechanism().l0_target(self)
        return None if per_layer is None else per_layer * self.n_layers


# ---- per-layer sparsity: pre-activations (B, L, F) -> codes (B, L, F) ----------------------------------------------
class LayerSparsity(nnx.Module):
    """How a CLT's pre-activations become codes, layer by layer; holds the mechanism's own state."""

    def train_codes(self, pre: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Codes used by the training loss (may depend on the batch), and stats after_step needs."""
        return self.infer_codes(pre), {}

    def infer_codes(self, pre: jax.Array) -> jax.Array:
        """Codes of each row on its own."""
        raise NotImplementedError

    def penalty(self, clt: CrossLayerTranscoder, pre: jax.Array, err: jax.Array,
                optional: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        return jnp.zeros((), jnp.float32), {}

    def after_step(self, metrics: dict[str, jax.Array]) -> None:
        """Update the mechanism's state after an optimiser step."""

    def init_from_data(self, clt: CrossLayerTranscoder, x: jax.Array) -> None:
        """Data-dependent start from a sample of (scaled) inputs (rows, L, d_in)."""

    def fold(self, code_scale: jax.Array) -> None:
        """Codes of layer l are about to be multiplied by code_scale[l] (L,): rescale thresholds to match."""

    def thresholds(self) -> jax.Array | None:
        """(L, F) inference thresholds (a code fires where pre > threshold), or None (TopK: the k largest)."""
        return None


def _topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """(..., F) float mask of each row's k largest scores."""
    flat = jax.lax.stop_gradient(scores).reshape(-1, scores.shape[-1])
    _, idx = top_k(flat, k)
    mask = jnp.zeros(flat.shape, scores.dtype).at[jnp.arange(flat.shape[0])[:, None], idx].set(1.0)
    return mask.reshape(scores.shape)


class AuxKLayers(LayerSparsity):
    """The TopK family's AuxK for a CLT: per row and layer, the top k_aux dead latents (by pre-activation)
    reconstruct the detached residual of every layer through their cross-layer decoders (no biases), as a
    fraction of its variance, scaled by min(dead / (k_aux * L), 1). Computed only when some latent is dead."""

    def __init__(self, config: CLTConfig):
        self.k = config.k
        self.k_aux = min(config.k_aux or max(config.d_in // 2, 1), config.n_features)
        self.aux_coefficient = config.aux_coefficient

    def penalty(self, clt, pre, err, optional):
        if self.aux_coefficient == 0:
            return jnp.zeros((), jnp.float32), {}
        if not optional:
            return jnp.zeros((), jnp.float32), {"auxk": jnp.zeros((), jnp.float32)}
        dead = clt.dead_mask()  # (L, F)
        scores = jnp.where(dead, jax.lax.stop_gradient(pre), -jnp.inf)
        codes = jax.nn.relu(pre) * _topk_mask(scores, self.k_aux) * dead.astype(pre.dtype)
        resid = -jax.lax.stop_gradient(err)
        resid_hat = clt.decode_codes(codes)
        denom = jnp.maximum(jnp.sum((resid - resid.mean(0)) ** 2), 1e-12)
        scale = jnp.minimum(jnp.sum(dead) / (self.k_aux * dead.shape[0]), 1.0)
        aux = scale * jnp.sum((resid_hat - resid) ** 2) / denom
        return self.aux_coefficient * aux, {"auxk": aux}


class TopKLayers(AuxKLayers):
    """Each row keeps its k largest (ReLU'd) pre-activations in every layer."""

    def infer_codes(self, pre):
        return jax.nn.relu(pre) * _topk_mask(pre, self.k)


class BatchTopKLayers(AuxKLayers):
    """Training: each layer keeps its k * B largest activations over the batch. Inference: a JumpReLU with
    one threshold per layer (an exponential moving average of the batch thresholds)."""

    def __init__(self, config: CLTConfig):
        super().__init__(config)
        self.threshold_momentum = config.threshold_momentum
        self.n_features = config.n_features
        self.threshold = Buffer(jnp.zeros((config.n_layers,), jnp.float32))
        self.threshold_updates = Buffer(jnp.zeros((), jnp.int32))

    def train_codes(self, pre):
        z = jax.nn.relu(pre)
        kth = min(self.k * pre.shape[0], pre.shape[0] * pre.shape[-1])
        t = jax.vmap(kth_largest_nonneg, in_axes=(1, None))(jax.lax.stop_gradient(z), kth)  # (L,)
        return z * (jax.lax.stop_gradient(z) >= t[:, None]).astype(z.dtype), {"batch_threshold": t}

    def infer_codes(self, pre):
        return pre * (pre > self.threshold[...][:, None]).astype(pre.dtype)

    def after_step(self, metrics):
        t, m = metrics["batch_threshold"], self.threshold_momentum
        first = self.threshold_updates[...] == 0
        self.threshold[...] = jnp.where(first, t, m * self.threshold[...] + (1 - m) * t)
        self.threshold_updates[...] = self.threshold_updates[...] + 1

    def fold(self, code_scale):
        self.threshold[...] = self.threshold[...] * code_scale

    def thresholds(self):
        return jnp.broadcast_to(self.threshold[...][:, None], (self.threshold.shape[0], self.n_features))


class JumpReLULayers(LayerSparsity):
    """A learned threshold per latent and layer, log_threshold (L, F), trained against mse + l0_coefficient *
    (active latents per row over all layers) with the JumpReLU SAE's straight-through estimators. With
    target_l0, as for the JumpReLU SAE, one adapted scale multiplies every threshold until the mean active
    latents per row and layer reach the target."""

    def __init__(self, config: CLTConfig):
        self.l0_coefficient = config.l0_coefficient
        self.l0_warmup_steps = config.l0_warmup_steps
        self.bandwidth = config.bandwidth
        shape = (config.n_layers, config.n_features)
        self.log_threshold = nnx.Param(jnp.full(shape, math.log(config.initial_threshold), jnp.float32))
        self.step = Buffer(jnp.zeros((), jnp.int32))
        self.control = penalty_coefficient(config)  # with target_l0: the scale on every threshold

    def thresholds(self):
        return jnp.exp(self.log_threshold[...]) * self.control.scale()

    def train_codes(self, pre):
        return jumprelu(pre, self.thresholds(), self.bandwidth), {}

    def infer_codes(self, pre):
        return pre * (pre > self.thresholds()).astype(pre.dtype)

    def penalty(self, clt, pre, err, optional):
        l0 = jnp.mean(jnp.sum(heaviside(pre, self.thresholds(), self.bandwidth), axis=(1, 2)))
        coef = self.l0_coefficient * warmup(self.step[...], self.l0_warmup_steps)
        return coef * l0, {"l0_coefficient": coef, **self.control.metrics()}

    def init_from_data(self, clt, x):
        """With a target L0: each layer's thresholds where the sample fires target_l0 latents per row."""
        if clt.config.target_l0 is not None:
            levels = jax.vmap(self.control.start_levels, in_axes=1)(clt.preacts(x[:START_ROWS]))
            self.log_threshold[...] = jnp.log(jnp.maximum(levels, MIN_THRESHOLD) / self.control.scale())

    def after_step(self, metrics):
        self.control.update(metrics["l0"] / self.log_threshold.shape[0], self.step[...])
        self.step[...] = self.step[...] + 1

    def fold(self, code_scale):
        self.log_threshold[...] = self.log_threshold[...] + jnp.log(code_scale)[:, None]


LAYER_SPARSITIES: dict[str, type[LayerSparsity]] = {"topk": TopKLayers, "batchtopk": BatchTopKLayers,
                                                     "jumprelu": JumpReLULayers}


def _unit_directions(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Random directions of unit norm over every axis but the first."""
    w = jax.random.normal(key, shape, jnp.float32)
    return w / jnp.linalg.norm(w.reshape(shape[0], -1), axis=1).reshape((-1,) + (1,) * (len(shape) - 1))


@register
class CrossLayerTranscoder(Decomposer):
    """Per-layer encoders reading mlp_in.l; each layer's latents write to that layer and every later one."""

    kind: ClassVar[str] = "clt"
    config_cls: ClassVar[type[DecomposerConfig]] = CLTConfig
    export_format: ClassVar[str] = "clt"  # export.circuit_tracer writes circuit-tracer's CLT layout
    site_axis: ClassVar[bool] = True
    # Stems without a layer, as for every kind; the suite completes them with a two-layer range.
    example: ClassVar[dict] = {"hookpoint_in": "mlp_in", "hookpoint_out": "mlp_out", "expansion": 2, "k": 8,
                               "sparsity": "batchtopk"}

    def __init__(self, config: CLTConfig, *, rngs: nnx.Rngs):
        self.config = config
        n_layers, n, d_in, d_out = config.n_layers, config.n_features, config.d_in, config.d_out
        enc = _unit_directions(rngs.params(), (n_layers * n, d_in)).reshape(n_layers, n, d_in)
        self.W_enc = nnx.Param(config.encoder_init_norm * jnp.swapaxes(enc, 1, 2))
        self.b_enc = nnx.Param(jnp.zeros((n_layers, n), jnp.float32))
        self.b_in = nnx.Param(jnp.zeros((n_layers, d_in), jnp.float32))
        for i in range(n_layers):
            setattr(self, f"W_dec_{i}", nnx.Param(_unit_directions(rngs.params(), (n, n_layers - i, d_out))))
        self.b_dec = nnx.Param(jnp.zeros((n_layers, d_out), jnp.float32))
        # Tokens seen since each latent last fired (saturates at DEAD_CAP), per layer.
        self.tokens_since_fired = Buffer(jnp.zeros((n_layers, n), jnp.int32))
        self.sparsity = LAYER_SPARSITIES[config.sparsity](config)

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def decoder(self, i: int) -> nnx.Param:
        """W_dec_{i} (F, L - i, d_out): what the latents of layer i write to layers i..L-1."""
        return getattr(self, f"W_dec_{i}")

    def dead_mask(self) -> jax.Array:
        """(L, F) bool: latents that have not fired for `dead_tokens` tokens."""
        return self.tokens_since_fired[...] >= self.config.dead_tokens

    def thresholds(self) -> jax.Array | None:
        """(L, F) inference thresholds (BatchTopK, JumpReLU), or None (TopK keeps k per row and layer)."""
        return self.sparsity.thresholds()

    # ---- the pieces -----------------------------------------------------------------------------
    def preacts(self, x: jax.Array) -> jax.Array:
        """(B, L, d_in) raw inputs -> (B, L, F) pre-activations."""
        return jnp.einsum("bld,ldf->blf", x.astype(jnp.float32) - self.b_in[...], self.W_enc[...]) + self.b_enc[...]

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """(B, L, F) codes -> (B, L, d_out) without the output bias: output j sums sources i <= j."""
        batch, n_layers = codes.shape[0], self.n_layers
        out = jnp.zeros((batch, n_layers, self.config.d_out), jnp.float32)
        for i in range(n_layers):
            w = self.decoder(i)[...]
            part = (codes[:, i] @ w.reshape(w.shape[0], -1)).reshape(batch, n_layers - i, -1)
            out = out.at[:, i:].add(part)
        return out

    # ---- protocol -------------------------------------------------------------------------------
    def encode(self, x: jax.Array) -> jax.Array:
        """(B, L, d_in) -> (B, L, F) codes, each row on its own."""
        return self.sparsity.infer_codes(self.preacts(x))

    def decode(self, codes: jax.Array) -> jax.Array:
        """(B, L, F) -> (B, L, d_out) reconstruction of every output site."""
        return self.decode_codes(codes) + self.b_dec[...]

    def loss(self, batch: dict[str, jax.Array], optional: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, y = batch["x"], batch["y"].astype(jnp.float32)
        pre = self.preacts(x)
        codes, stats = self.sparsity.train_codes(pre)
        err = self.decode(codes) - y
        layer_mse = jnp.mean(jnp.sum(err**2, axis=-1), axis=0)  # (L,)
        layer_var = jnp.maximum(jnp.mean(jnp.sum((y - y.mean(0)) ** 2, axis=-1), axis=0), 1e-12)
        mse = jnp.sum(layer_mse)
        penalty, extra = self.sparsity.penalty(self, pre, err, optional)
        active = codes != 0
        layer_l0 = jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32), axis=0)  # (L,)
        metrics = {
            "mse": mse,
            "fvu": mse / jnp.sum(layer_var),
            "l0": jnp.sum(layer_l0),
            "fired": jnp.any(active, axis=0).reshape(-1),  # (L * F,), layer-major
            "n_tokens": jnp.asarray(x.shape[0], jnp.float32),
            "dead_frac": jnp.mean(self.dead_mask().astype(jnp.float32)),
            **stats,
            **extra,
        }
        for j, site in enumerate(self.config.hookpoints_out()):
            metrics[f"fvu_{site}"] = layer_mse[j] / layer_var[j]
        for i, site in enumerate(self.config.hookpoints_in()):
            metrics[f"l0_{site}"] = layer_l0[i]
        return mse + penalty, metrics

    def loss_and_grads(self, batch):
        """AuxK (its extra decode) only in steps where some latent is dead, under lax.cond."""
        if not isinstance(self.sparsity, AuxKLayers) or self.sparsity.aux_coefficient == 0:
            return super().loss_and_grads(batch)
        graphdef, state = nnx.split(self)

        def version(optional: bool):
            return lambda s: nnx.value_and_grad(lambda m: m.loss(batch, optional), has_aux=True)(nnx.merge(graphdef, s))

        return jax.lax.cond(jnp.any(self.dead_mask()), version(True), version(False), state)

    def features(self) -> jax.Array:
        """(L * F, d_out), layer-major: each latent's write to its own layer (its decoder's first block). The
        writes to later layers are `decoder(i)[:, 1:]`."""
        return jnp.concatenate([self.decoder(i)[...][:, 0] for i in range(self.n_layers)])

    # ---- training hooks ------------------------------------------------------------------------
    def init_from_data(self, x: jax.Array, y: jax.Array) -> None:
        """b_dec[l] at the geometric median of output site l, b_in[l] at that of input site l."""
        median = jax.vmap(lambda p: geometric_median(p, self.config.median_iters), in_axes=1)
        self.b_dec[...] = median(y)
        self.b_in[...] = median(x)
        self.sparsity.init_from_data(self, x)

    def project_grads(self, grads: nnx.State) -> nnx.State:
        """Remove the part of each decoder gradient parallel to its (unit-norm, all-layer) decoder."""
        if not self.config.normalize_decoder:
            return grads
        for i in range(self.n_layers):
            name = f"W_dec_{i}"
            w, g = self.decoder(i)[...], grads[name][...]
            grads[name] = grads[name].replace(g - jnp.sum(g * w, axis=(1, 2), keepdims=True) * w)
        return grads

    def after_step(self, metrics: dict[str, jax.Array]) -> None:
        fired = metrics["fired"].reshape(self.tokens_since_fired.shape)
        seen = jnp.minimum(self.tokens_since_fired[...] + metrics["n_tokens"].astype(jnp.int32), DEAD_CAP)
        self.tokens_since_fired[...] = jnp.where(fired, 0, seen)
        if self.config.normalize_decoder:
            for i in range(self.n_layers):
                w = self.decoder(i)[...]
                self.decoder(i)[...] = w / jnp.maximum(jnp.sqrt(jnp.sum(w * w, axis=(1, 2), keepdims=True)), 1e-12)
        self.sparsity.after_step(metrics)

    def fold_input_scale(self, scale_in, scale_out) -> None:
        """Trained on (scale_in[l] * x_l -> scale_out[l] * y_l); afterwards reads raw x and writes raw y.

        Scales are per site, arrays (L,) (a number means the same for every layer). Codes of layer l are
        divided by scale_out[l], so with one scale for every layer the decoders keep their norm and a code is
        the length of its contribution in raw units, as in the SAEs; the decoder block from layer i to layer
        j is multiplied by scale_out[i] / scale_out[j]. Exact; fold_input_scale(1/scale_in, 1/scale_out)
        undoes it."""
        n_layers = self.n_layers
        s_in = np.broadcast_to(np.asarray(scale_in, np.float64), (n_layers,))
        s_out = np.broadcast_to(np.asarray(scale_out, np.float64), (n_layers,))
        if not (np.all(s_in > 0) and np.all(s_out > 0)):
            raise ValueError(f"fold_input_scale needs positive scales, got {scale_in}, {scale_out}")
        c = jnp.asarray(1.0 / s_out, jnp.float32)  # the code scale of each source layer
        self.W_enc[...] = self.W_enc[...] * jnp.asarray(s_in / s_out, jnp.float32)[:, None, None]
        self.b_enc[...] = self.b_enc[...] * c[:, None]
        self.b_in[...] = self.b_in[...] / jnp.asarray(s_in, jnp.float32)[:, None]
        for i in range(n_layers):
            ratio = jnp.asarray(s_out[i] / s_out[i:], jnp.float32)
            self.decoder(i)[...] = self.decoder(i)[...] * ratio[None, :, None]
        self.b_dec[...] = self.b_dec[...] * c[:, None]
        self.sparsity.fold(c)
