"""CPU kernels for the TopK step through XLA's FFI: OpenBLAS's float32 GEMM, a threaded exact top-k, a
bucketed row scatter-add and gathered dot products, and row dot products.

On the 2-core CPUs we measure on, XLA's own GEMM runs the encoder matmul at 70-80% of OpenBLAS's rate,
its TopK custom call takes longer than the whole rest of the selection, its scatter-add reads and writes
a whole table row per entry, and its reduction fusion turns the decoder's renormalisation after Adam
into passes over materialised constants. `cpu_kernels.cc` holds the replacements; it is compiled on first
use with the system C++ compiler against jaxlib's FFI headers and scipy-openblas32 (a dependency), and
cached under ~/.cache/dictlearn/kernels (or $DICTLEARN_KERNEL_CACHE), keyed by the source, the compiler
and its flags, jax, the BLAS and the CPU.

They run only on a single CPU device. On GPU or TPU, on a mesh of several devices (whose shardings an
opaque custom call would break), with DICTLEARN_CPU_KERNELS=0, or when the build fails (a warning
says why, once), the XLA ops run instead; results agree either way (see tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
MATMUL_TARGET = "dictlearn_cpu_matmul_nt"
TOPK_TARGET = "dictlearn_cpu_top_k"
ROW_DOTS_TARGET = "dictlearn_cpu_row_dots"
SCATTER_ROWS_TARGET = "dictlearn_cpu_scatter_rows"
GATHER_DOTS_TARGET = "dictlearn_cpu_gather_dots"
SCATTER_ROWS_AT_TARGET = "dictlearn_cpu_scatter_rows_at"
GATHER_DOTS_AT_TARGET = "dictlearn_cpu_gather_dots_at"
HANDLERS = {MATMUL_TARGET: "DictlearnMatmulNT", TOPK_TARGET: "DictlearnTopK", ROW_DOTS_TARGET: "DictlearnRowDots",
            SCATTER_ROWS_TARGET: "DictlearnScatterRows", GATHER_DOTS_TARGET: "DictlearnGatherDots",
            SCATTER_ROWS_AT_TARGET: "DictlearnScatterRowsAt", GATHER_DOTS_AT_TARGET: "DictlearnGatherDotsAt"}  # XLA name -> C symbol


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded; the XLA ops are used instead."""


def cache_dir() -> Path:
    return Path(os.environ.get("DICTLEARN_KERNEL_CACHE", Path.home() / ".cache" / "dictlearn" / "kernels"))


def _openblas() -> tuple[str, str, str]:
    """(include dir, library dir, library name) of scipy-openblas32."""
    try:
        import scipy_openblas32 as blas
    except ImportError as e:
        raise KernelBuildError("scipy-openblas32 is not installed (pip install scipy-openblas32)") from e
    return blas.get_include_dir(), blas.get_lib_dir(), blas.get_library()


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.machine() + platform.processor()


def build(force: bool = False) -> Path:
    """Compile cpu_kernels.cc into the cache (atomically, so concurrent processes are safe); return the .so."""
    if sys.platform not in ("linux", "darwin"):
        raise KernelBuildError(f"the CPU kernels are built on Linux and macOS only, not {sys.platform}")
    include, libdir, libname = _openblas()
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise KernelBuildError(f"no C++ compiler ({cxx!r} not found; install g++ or set CXX)")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp-simd", "-w"]
    # The CPU is part of the key in case a cache folder is shared between machines.
    ident = [SOURCE.read_bytes(), jax.__version__, libdir, cxx, " ".join(flags), _cpu_identity()]
    key = hashlib.sha256(repr(ident).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", f"-I{include}", str(SOURCE), f"-L{libdir}", f"-l{libname}",
               f"-Wl,-rpath,{libdir}", "-o", str(tmp_so)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(tmp_so, out)
    return out


@functools.cache
def _load() -> bool:
    """Build (or find) the kernels and register them with XLA; False, with one warning, if that fails."""
    # OpenBLAS's threads spin for about 2**28 cycles after each call before sleeping; on a few cores that
    # steals one from whatever XLA runs next (measured: the top-k after the GEMM ran 40% slower).
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        lib = ctypes.CDLL(str(build()))
        for target, symbol in HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (KernelBuildError, OSError, AttributeError) as e:
        warnings.warn(f"dictlearn's CPU kernels are unavailable, using XLA's ops (slower): {e}", stacklevel=3)
        return False
    return True


def enabled() -> bool:
    """Use the kernels in the function being traced? Single CPU device, not turned off, built."""
    if os.environ.get("DICTLEARN_CPU_KERNELS", "1") == "0":
        return False
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    return _load()


def _call(target: str, out, *args: jax.Array, threaded: bool = True, **attrs: int):
    """One kernel call on constant inputs (the kernels have no derivative rules of their own); the threaded
    ones split their rows over this machine's cores."""
    if threaded:
        attrs["threads"] = os.cpu_count() or 1
    args = tuple(jax.lax.stop_gradient(a) for a in args)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args, **{k: int(v) for k, v in attrs.items()})


# ---- a @ w.T ---------------------------------------------------------------------------------------


def _matmul_nt_call(a: jax.Array, w: jax.Array) -> jax.Array:
    return _call(MATMUL_TARGET, jax.ShapeDtypeStruct((a.shape[0], w.shape[0]), jnp.float32), a, w, threaded=False)


def _matmul_nt_bwd(res, g):
    a, w = res
    return g @ w, g.T @ a


_matmul_nt = jax.custom_vjp(_matmul_nt_call)
_matmul_nt.defvjp(lambda a, w: (_matmul_nt_call(a, w), (a, w)), _matmul_nt_bwd)


def matmul_nt(a: jax.Array, w: jax.Array) -> jax.Array:
    """a @ w.T for float32 a (M, K) and w (N, K): OpenBLAS on a single CPU device, XLA elsewhere.
    Differentiable (the backward's matmuls are XLA's)."""
    if a.ndim != 2 or w.ndim != 2 or a.dtype != jnp.float32 or w.dtype != jnp.float32 or not enabled():
        return a @ w.T
    return _matmul_nt(a, w)


# ---- top-k of rows -----------------------------------------------------------------------------------


def top_k_rows(x: jax.Array, k: int, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array] | None:
    """Exact top-k of each row of x (+ bias): (values, int32 indices), sorted by decreasing value, ties to
    the lower index, like lax.top_k. None where the kernel does not apply (the caller uses XLA's). No
    gradient: callers select with it and read values through their own differentiable path."""
    if x.ndim < 1 or x.dtype != jnp.float32 or not 0 < k <= x.shape[-1] or not enabled():
        return None
    n = x.shape[-1]
    lead = x.shape[:-1]
    b = jnp.zeros((n,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    rows = x.reshape(-1, n)
    out = (jax.ShapeDtypeStruct((rows.shape[0], k), jnp.float32), jax.ShapeDtypeStruct((rows.shape[0], k), jnp.int32))
    vals, idx = _call(TOPK_TARGET, out, rows, b, k=k)
    return vals.reshape(*lead, k), idx.reshape(*lead, k)


# ---- row dot products ----------------------------------------------------------------------------------


def row_dots(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum(a * b, axis=1) for two float32 (n, d) arrays, without gradient (the decoder's norms and
    projections, computed outside autodiff)."""
    if a.ndim != 2 or a.shape != b.shape or a.dtype != jnp.float32 or b.dtype != jnp.float32 or not enabled():
        return jnp.sum(a * b, axis=1)
    return _call(ROW_DOTS_TARGET, jax.ShapeDtypeStruct((a.shape[0],), jnp.float32), a, b)


# ---- scatter-add of scaled rows -----------------------------------------------------------------------


def _f32(*arrays: jax.Array) -> bool:
    return all(a.dtype == jnp.float32 for a in arrays)


def scatter_rows(weights: jax.Array, indices: jax.Array, rows: jax.Array, n: int,
                 row_of: jax.Array | None = None) -> jax.Array | None:
    """out[i] = sum over (b, j) with indices[b, j] == i of weights[b, j] * rows[b]  ->  (n, d), no gradient.
    With `row_of` (B, k), rows[row_of[b, j]] replaces rows[b] (rows is then any (R, d)). Slots of weight
    zero are skipped (BatchTopK's unselected candidates cost nothing). None where the kernel does not apply
    (the caller uses XLA's scatter). Indices must lie in [0, n), row_of in [0, R)."""
    if (weights.ndim != 2 or indices.shape != weights.shape or rows.ndim != 2 or not _f32(weights, rows)
            or (row_of is None and rows.shape[0] != weights.shape[0]) or (row_of is not None and row_of.shape != weights.shape)
            or not enabled()):
        return None
    out = jax.ShapeDtypeStruct((n, rows.shape[1]), jnp.float32)
    if row_of is None:
        return _call(SCATTER_ROWS_TARGET, out, weights, indices.astype(jnp.int32), rows)
    return _call(SCATTER_ROWS_AT_TARGET, out, weights, indices.astype(jnp.int32), rows, row_of.astype(jnp.int32))


# ---- dot products with gathered rows ------------------------------------------------------------------


def gather_dots(rows: jax.Array, indices: jax.Array, table: jax.Array, row_of: jax.Array | None = None) -> jax.Array | None:
    """out[b, j] = <rows[b], table[indices[b, j]]>  ->  (B, k), no gradient. With `row_of` (B, k),
    rows[row_of[b, j]] replaces rows[b] (rows is then any (R, d)), and a slot with row_of -1 gets 0
    without any work. None where the kernel does not apply (the caller uses XLA's gather). Indices must lie
    in [0, n), row_of in [-1, R)."""
    if (rows.ndim != 2 or indices.ndim != 2 or table.ndim != 2 or table.shape[1] != rows.shape[1]
            or (row_of is None and indices.shape[0] != rows.shape[0]) or (row_of is not None and row_of.shape != indices.shape)
            or not _f32(rows, table) or not enabled()):
        return None
    out = jax.ShapeDtypeStruct(indices.shape, jnp.float32)
    if row_of is None:
        return _call(GATHER_DOTS_TARGET, out, rows, indices.astype(jnp.int32), table)
    return _call(GATHER_DOTS_AT_TARGET, out, rows, indices.astype(jnp.int32), table, row_of.astype(jnp.int32))
