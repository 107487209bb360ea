"""Semi-NMF of MLP hidden activations as a decomposer (Shafran, Geiger and Geva 2025).

x (B, d_mlp) ~= codes (B, K) @ F^T with F signed (d_mlp, K): each feature is a sparse signed
combination of co-activating neurons, and codes >= 0 say how much of each feature a token holds.
Codes are not a learned encoder: `encode` solves the non-negative least-squares problem for the
given activations with F fixed, in a fixed number of steps (jittable).

Its features write at `hookpoint_in` (an MLP hidden site); mapping them into the residual stream through
the MLP's output projection (F^T W_out) is the model family's knowledge (`families.to_residual`). As a
convenience for its export format, a SemiNMF given W_out stores those directions (`resid`, (K, d_model))
and the hookpoint where they appear (`resid_hookpoint`); `resid_features()` returns them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dictlearn.decomposers import snmf_solver
from dictlearn.decomposers.base import Decomposer, DecomposerConfig, register


@dataclasses.dataclass
class SNMFConfig(DecomposerConfig):
    """d_in = d_mlp (the MLP hidden width), n_features = K. d_model > 0 stores residual directions."""

    d_model: int = 0  # width of the residual stream the MLP writes to; 0: no residual directions stored
    resid_hookpoint: str = ""  # where the stored residual directions appear (the output projection's output)
    encode_iters: int = 100  # fixed steps of the non-negative code solve
    encode_solver: str = "pgd"  # "pgd" (accelerated projected gradient, exact zeros) | "mu" (multiplicative)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_out != self.d_in:
            raise ValueError(f"semi-NMF reconstructs its input: d_out must equal d_in ({self.d_in}), got {self.d_out}")
        if self.hookpoint_out != self.hookpoint_in:
            raise ValueError(f"semi-NMF reads and writes one hookpoint; got hookpoint_in {self.hookpoint_in!r} "
                             f"and hookpoint_out {self.hookpoint_out!r}")
        if self.resid_hookpoint and self.d_model == 0:
            raise ValueError(f"resid_hookpoint {self.resid_hookpoint!r} is set but no residual directions are stored (d_model 0)")
        if self.d_model < 0 or self.encode_iters <= 0:
            raise ValueError(f"d_model must be >= 0 and encode_iters > 0, got {self.d_model} and {self.encode_iters}")
        if self.encode_solver not in ("pgd", "mu"):
            raise ValueError(f"encode_solver must be 'pgd' or 'mu', got {self.encode_solver!r}")


@register
class SemiNMF(Decomposer):
    """x ~= codes @ F^T with F signed and codes >= 0 solved per token (no learned encoder)."""

    kind: ClassVar[str] = "snmf"
    config_cls: ClassVar[type[DecomposerConfig]] = SNMFConfig
    trainer: ClassVar[str] = "snmf"  # alternating solves, not gradient steps (trainers/snmf.py)
    export_format: ClassVar[str] = "snmf"  # export/snmf_format.py
    example: ClassVar[dict] = {"hookpoint_in": "mlp_hidden", "n_features": 16, "max_iters": 20, "patience": 20,
                               "keep_fraction": 0.25, "encode_iters": 50}

    def __init__(self, config: SNMFConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, k = config.d_in, config.n_features
        f = jax.random.normal(rngs.params(), (d, k), jnp.float32)
        self.F = nnx.Param(f / jnp.linalg.norm(f, axis=0, keepdims=True))  # (d_mlp, K), unit columns
        if config.d_model > 0:
            self.resid = nnx.Variable(jnp.zeros((k, config.d_model), jnp.float32))  # (K, d_model) = F^T W_out

    def encode(self, x: jax.Array) -> jax.Array:
        f = self.F[...]
        return snmf_solver.solve_codes(x @ f, f.T @ f, self.config.encode_iters, self.config.encode_solver)

    def decode(self, codes: jax.Array) -> jax.Array:
        return codes @ self.F[...].T

    def loss(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, y = batch["x"], batch.get("y", batch["x"])
        codes = self.encode(x)
        err = jnp.sum((y - self.decode(codes)) ** 2, axis=-1)
        total = jnp.sum((y - jnp.mean(y, axis=0)) ** 2)
        mse = jnp.mean(err)
        metrics = {
            "mse": mse,
            "fvu": jnp.sum(err) / jnp.maximum(total, 1e-30),
            "l0": jnp.mean(jnp.sum(codes > 0, axis=-1).astype(jnp.float32)),
            "fired": jnp.any(codes > 0, axis=0),
        }
        return mse, metrics

    def features(self) -> jax.Array:
        """(K, d_mlp): each feature's direction in MLP-neuron space (unit norm when trained)."""
        return self.F[...].T

    def resid_features(self) -> jax.Array:
        """(K, d_model): each feature mapped through the MLP output projection, F^T W_out."""
        if self.config.d_model == 0:
            raise ValueError("this semi-NMF stores no residual directions (d_model = 0): train it with the MLP's "
                             "output weights or call set_w_out(*families.output_projection(model, hookpoint)) first")
        return self.resid[...]

    def set_w_out(self, w_out: np.ndarray | jax.Array, resid_hookpoint: str = "") -> None:
        """Store F^T W_out given W_out (d_mlp, d_model), e.g. down_proj.weight.T of a Llama MLP, and the hookpoint
        where hidden @ W_out appears: `set_w_out(*families.output_projection(model, hookpoint))`."""
        w_out = jnp.asarray(w_out, jnp.float32)
        if w_out.ndim != 2 or w_out.shape[0] != self.config.d_in:
            hint = " (it looks transposed: pass down_proj.weight.T)" if w_out.ndim == 2 and w_out.shape[1] == self.config.d_in else ""
            raise ValueError(f"w_out must be (d_mlp={self.config.d_in}, d_model), got {tuple(w_out.shape)}{hint}")
        if self.config.d_model not in (0, w_out.shape[1]):
            raise ValueError(f"w_out has d_model {w_out.shape[1]} but this decomposer stores {self.config.d_model}")
        self.config = dataclasses.replace(self.config, d_model=int(w_out.shape[1]),
                                          resid_hookpoint=resid_hookpoint or self.config.resid_hookpoint)
        self.resid = nnx.Variable(self.F[...].T @ w_out)

    def set_features(self, f: jax.Array) -> None:
        """Install trained F (d_mlp, K); columns are scaled to unit norm (codes carry the magnitude)."""
        f = jnp.asarray(f, jnp.float32)
        if f.shape != (self.config.d_in, self.config.n_features):
            raise ValueError(f"F must be (d_in, n_features) = {(self.config.d_in, self.config.n_features)}, got {f.shape}")
        norms = jnp.linalg.norm(f, axis=0, keepdims=True)
        self.F[...] = jnp.where(norms > 0, f / jnp.where(norms > 0, norms, 1.0), 0.0)

    def fold_input_scale(self, scale_in: float, scale_out: float) -> None:
        """Nothing to fold: codes solved with F fixed scale with their input (encode(s x) = s encode(x)),
        so F trained on s * x reads and writes raw x as it is. Only equal scales make sense here."""
        if not np.isclose(scale_in, scale_out, rtol=1e-6):
            raise ValueError(f"semi-NMF reconstructs its own input, so scale_in and scale_out must be equal; "
                             f"got {scale_in} and {scale_out}")
        if not scale_in > 0:
            raise ValueError(f"scale must be positive, got {scale_in}")
