"""One neutral description of an affine dictionary, between dictlearn's kinds and other tools' formats.

Every SAE and transcoder here, and those of SAELens and sparsify, computes

    pre   = (x - b_pre) @ W_enc + b_enc              (b_pre: an input bias, or none)
    codes = sparsity(pre)                             relu | topk(k) | jumprelu(threshold)
    y_hat = codes @ W_dec + b_dec [+ x @ W_skip.T]    (W_skip: a skip transcoder's linear path)

`LinearDictionary` holds exactly those arrays (float32, shapes as above: W_enc (d_in, n), W_dec (n, d_out),
W_skip (d_out, d_in)). Converters for foreign formats only know this class; the mapping between it and
the parameter names of each dictlearn kind lives in `dictlearn.export.kinds`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SPARSITIES = ("relu", "topk", "jumprelu")


@dataclass
class LinearDictionary:
    sparsity: str  # relu | topk | jumprelu
    W_enc: np.ndarray  # (d_in, n)
    b_enc: np.ndarray  # (n,)
    W_dec: np.ndarray  # (n, d_out)
    b_dec: np.ndarray  # (d_out,)
    b_pre: np.ndarray | None = None  # (d_in,) subtracted from x before encoding
    threshold: np.ndarray | None = None  # (n,) jumprelu: a code is kept when pre > threshold
    k: int | None = None  # topk: codes kept per row
    W_skip: np.ndarray | None = None  # (d_out, d_in)
    hookpoint_in: str = ""
    hookpoint_out: str = ""

    def __post_init__(self) -> None:
        f32 = lambda a: None if a is None else np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "b_pre", "threshold", "W_skip"):
            setattr(self, name, f32(getattr(self, name)))
        if self.sparsity not in SPARSITIES:
            raise ValueError(f"sparsity {self.sparsity!r} is not one of {', '.join(SPARSITIES)}")
        d_in, n = self.W_enc.shape
        shapes = {"b_enc": (n,), "W_dec": (n, self.W_dec.shape[1]), "b_dec": (self.W_dec.shape[1],)}
        if self.b_pre is not None:
            shapes["b_pre"] = (d_in,)
        if self.threshold is not None:
            shapes["threshold"] = (n,)
        if self.W_skip is not None:
            shapes["W_skip"] = (self.W_dec.shape[1], d_in)
        if self.W_dec.shape[0] != n:
            raise ValueError(f"W_enc is {self.W_enc.shape} but W_dec is {self.W_dec.shape}: their feature counts differ")
        for name, want in shapes.items():
            got = getattr(self, name).shape
            if got != want:
                raise ValueError(f"{name} has shape {got}, expected {want} for W_enc {self.W_enc.shape}, W_dec {self.W_dec.shape}")
        if self.sparsity == "jumprelu" and self.threshold is None:
            raise ValueError("a jumprelu dictionary needs a threshold")
        if self.sparsity == "topk" and not (self.k and 0 < self.k <= n):
            raise ValueError(f"a topk dictionary needs k in 1..{n}, got {self.k}")
        if not self.hookpoint_out:
            self.hookpoint_out = self.hookpoint_in

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def is_transcoder(self) -> bool:
        return self.W_skip is not None or self.d_in != self.d_out or self.hookpoint_in != self.hookpoint_out

    def replace(self, **changes) -> "LinearDictionary":
        return dataclasses.replace(self, **changes)

    def without_input_bias(self) -> "LinearDictionary":
        """The same map with b_pre folded into b_enc: (x - b) W + c == x W + (c - b W)."""
        if self.b_pre is None:
            return self
        return self.replace(b_enc=(self.b_enc.astype(np.float64) - self.b_pre.astype(np.float64) @ self.W_enc).astype(np.float32),
                            b_pre=None)

    # Reference math in numpy (float32), used to check conversions and by tests.
    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        pre = (x - self.b_pre if self.b_pre is not None else x) @ self.W_enc + self.b_enc
        if self.sparsity == "relu":
            return np.maximum(pre, 0.0)
        if self.sparsity == "jumprelu":
            return np.where(pre > self.threshold, np.maximum(pre, 0.0), 0.0).astype(np.float32)
        idx = np.argpartition(-pre, self.k - 1, axis=-1)[..., : self.k]
        out = np.zeros_like(pre)
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0.0), -1)
        return out

    def decode(self, codes: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        y = np.asarray(codes, dtype=np.float32) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder's output needs its input x too")
            y = y + np.asarray(x, dtype=np.float32) @ self.W_skip.T
        return y
