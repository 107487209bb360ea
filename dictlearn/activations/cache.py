"""The on-disk activation cache: a folder of safetensors shards plus a JSON manifest.

Layout of a cache folder::

    manifest.json            format version, model (name, weights fingerprint, dtype), corpus fingerprint,
                             context length, hookpoints (width, stored dtype), token and row counts,
                             and the list of finished shards (rows, sequence range, split, sha256)
    shard-00000.safetensors  row-aligned tensors: one (rows, width) array per hookpoint (gradients under
                             `<hookpoint>@grad`), `token_id`, `seq`, `pos` (rows,) int32, and
                             `sequence_tokens` (sequences, context) int32 for showing any row's context

Shard k holds the tokens of sequences [seq_start, seq_stop), every row of them shuffled (seeded) before
the write. Shards are written to a temporary name, fsynced and renamed, and only then listed in the
manifest (itself replaced atomically), so a killed harvest leaves a cache whose listed shards are all
whole. bfloat16 is stored as safetensors "BF16" (numpy reads it through ml_dtypes); no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "dictlearn-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROW_KEYS = ("token_id", "seq", "pos")  # row-aligned metadata stored beside the activations
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "U16": np.uint16, "I16": np.int16}


class CacheError(RuntimeError):
    """A cache folder that is missing, incomplete, corrupt, or not what the caller expects."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with JSON `data` so that a reader sees either the old or the new file, never half."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _np_dtype(code: str):
    if code == "BF16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if code not in _ST_DTYPES:
        raise CacheError(f"unsupported tensor dtype {code!r} in a shard")
    return _ST_DTYPES[code]


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file; CacheError if the file is cut short or garbled."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CacheError(f"{path.name}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise CacheError(f"{path.name}: truncated or corrupt (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{path.name}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise CacheError(f"{path.name}: truncated or padded: header says {8 + n + end} bytes, file has {size}")
    return 8 + n, header


def to_float32(a: np.ndarray) -> np.ndarray:
    """Cast a stored float16/bfloat16/float32 array to float32 (bfloat16 by a bit shift: exact and fast)."""
    if a.dtype == np.float32:
        return np.array(a, dtype=np.float32, copy=True)
    if a.dtype.name == "bfloat16":  # bfloat16 is the top half of a float32
        out = np.empty(a.shape, dtype=np.uint32)
        np.left_shift(a.view(np.uint16), 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    return a.astype(np.float32)


class ActivationCache:
    """Read access to a cache folder (use `ActivationCache.open`)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> "ActivationCache":
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            hint = " (a harvest writes it: dictlearn harvest CONFIG.toml)" if not path.exists() else ""
            raise CacheError(f"{str(path)!r} is not an activation cache: {MANIFEST} is missing{hint}")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{mf}: corrupt manifest ({e})") from e
        if manifest.get("format") != FORMAT:
            raise CacheError(f"{mf}: not a dictlearn activation cache manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{mf}: cache format version {manifest.get('format_version')} is not supported "
                f"(this dictlearn reads version {FORMAT_VERSION}); harvest it again"
            )
        return cls(path, manifest)

    # --- description -------------------------------------------------------------------------------
    @property
    def hookpoints(self) -> dict[str, dict]:
        """name -> {"width", "dtype", ...} for every stored array (gradients as `<hookpoint>@grad`)."""
        return self.manifest["hookpoints"]

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def context_length(self) -> int:
        return int(self.manifest["context_length"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def shard_ids(self, split: str = "all") -> list[int]:
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be train, eval or all, got {split!r}")
        return [i for i, s in enumerate(self.shards) if split == "all" or s["split"] == split]

    def rows(self, split: str = "all") -> int:
        return sum(self.shards[i]["rows"] for i in self.shard_ids(split))

    @property
    def n_rows(self) -> int:
        return self.rows("all")

    def eval_sequences(self) -> np.ndarray:
        """Ids of the sequences in the held-out (eval) shards; no train row comes from them."""
        spans = [np.arange(s["seq_start"], s["seq_stop"]) for s in self.shards if s["split"] == "eval"]
        return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)

    def keys(self) -> list[str]:
        return list(self.hookpoints) + list(ROW_KEYS)

    # --- data ------------------------------------------------------------------------------------------
    def shard_arrays(self, index: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Memory-mapped arrays of shard `index` in their stored dtype (no copy until indexed)."""
        info = self.shards[index]
        path = self.path / info["file"]
        if not path.is_file():
            raise CacheError(f"{info['file']}: listed in the manifest but missing; rerun the harvest or `dictlearn cache verify`")
        start, header = read_safetensors_header(path)
        wanted = keys if keys is not None else list(header)
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        out = {}
        for k in wanted:
            if k not in header:
                raise CacheError(f"{info['file']}: has no array {k!r}; stored: {', '.join(sorted(header))}")
            t = header[k]
            a, b = t["data_offsets"]
            out[k] = mm[start + a : start + b].view(_np_dtype(t["dtype"])).reshape(t["shape"])
        return out

    def sequence_tokens(self, seq_ids) -> np.ndarray:
        """(n, context_length) token ids of the given sequence ids (the context of any row)."""
        seq_ids = np.atleast_1d(np.asarray(seq_ids, dtype=np.int64))
        out = np.empty((len(seq_ids), self.context_length), dtype=np.int32)
        starts = np.array([s["seq_start"] for s in self.shards])
        stops = np.array([s["seq_stop"] for s in self.shards])
        for j, sid in enumerate(seq_ids):
            hit = np.nonzero((starts <= sid) & (sid < stops))[0]
            if not len(hit):
                raise IndexError(f"sequence {sid} is in no shard of this cache")
            k = int(hit[0])
            out[j] = self.shard_arrays(k, ["sequence_tokens"])["sequence_tokens"][sid - starts[k]]
        return out

    # --- integrity ---------------------------------------------------------------------------------------
    def verify(self, checksums: bool = True) -> None:
        """Raise CacheError naming the first problem: an unfinished harvest, a missing, truncated or corrupt
        shard (sizes, headers, shapes, and with `checksums` the sha256 of every shard)."""
        if not self.complete:
            raise CacheError(
                f"{self.path}: the harvest is unfinished ({len(self.shards)} of {self.manifest.get('n_shards_planned')} "
                "shards); run the same `dictlearn harvest` command again to finish it"
            )
        widths = {k: v["width"] for k, v in self.hookpoints.items()}
        for info in self.shards:
            path = self.path / info["file"]
            if not path.is_file():
                raise CacheError(f"{info['file']}: missing from {self.path}")
            if path.stat().st_size != info["bytes"]:
                raise CacheError(f"{info['file']}: truncated or altered: {path.stat().st_size} bytes, manifest says {info['bytes']}")
            _, header = read_safetensors_header(path)
            for k, w in widths.items():
                shape = header.get(k, {}).get("shape")
                if shape != [info["rows"], w]:
                    raise CacheError(f"{info['file']}: array {k!r} has shape {shape}, expected {[info['rows'], w]}")
            if checksums and sha256_file(path) != info["sha256"]:
                raise CacheError(f"{info['file']}: corrupt: sha256 does not match the manifest")

    def summary(self) -> str:
        m = self.manifest
        lines = [
            f"cache      {self.path}" + ("" if self.complete else "  (UNFINISHED)"),
            f"model      {m['model']['name']}  [{m['model']['fingerprint']}]",
            f"corpus     {m['corpus']['config']['path']}  [{m['corpus']['fingerprint']}]",
            f"context    {self.context_length} tokens; {m['n_tokens']:,} tokens read, {self.n_rows:,} rows stored"
            + (f" (special tokens left out)" if m.get("excluded_token_ids") else ""),
            f"shards     {len(self.shards)} ({len(self.shard_ids('train'))} train / {len(self.shard_ids('eval'))} eval), "
            f"{self.rows('train'):,} / {self.rows('eval'):,} rows, {sum(s['bytes'] for s in self.shards) / 1e6:,.1f} MB",
            "hookpoints",
        ]
        for name, h in self.hookpoints.items():
            lines.append(f"  {name:<24} width {h['width']:<6} {h['dtype']}")
        return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class CacheWriter:
    """Appends finished shards to a cache folder; resumes one whose manifest has the same identity."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    @classmethod
    def create_or_resume(cls, path: str | Path, manifest: dict) -> "CacheWriter":
        """Start a cache at `path` with `manifest` (no shards yet), or resume the one already there.

        `manifest["identity"]` holds everything that decides the cache's content (model, corpus, harvest
        settings); an existing cache with a different identity is refused, never mixed."""
        path = Path(path)
        mf = path / MANIFEST
        if mf.is_file():
            old = ActivationCache.open(path).manifest
            a, b = _flatten(old.get("identity", {})), _flatten(manifest["identity"])
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if diff:
                shown = "; ".join(f"{k}: cache has {a.get(k)!r}, config has {b.get(k)!r}" for k in diff[:6])
                raise CacheError(
                    f"{path} already holds a cache harvested with a different config ({shown}). "
                    "Point out_dir elsewhere or delete that folder; caches are never mixed."
                )
            for stale in path.glob("*.tmp*"):  # a write the kill interrupted
                stale.unlink()
            return cls(path, old)
        if path.exists() and any(path.iterdir()):
            raise CacheError(f"{path} exists and is not empty but holds no {MANIFEST}; choose an empty or new folder")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {**manifest, "shards": [], "complete": False}
        write_json_atomic(mf, manifest)
        return cls(path, manifest)

    @property
    def n_done(self) -> int:
        return len(self.manifest["shards"])

    def add_shard(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Write the next shard atomically, then list it (with rows, bytes, sha256) in the manifest."""
        from safetensors.numpy import save

        index = self.n_done
        payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        name = shard_name(index)
        write_bytes_atomic(self.path / name, payload)
        entry = {"file": name, "index": index, **info, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        m = self.manifest
        m["shards"].append(entry)
        m["n_rows"] = sum(s["rows"] for s in m["shards"])
        m["n_tokens"] = sum(s["tokens"] for s in m["shards"])
        write_json_atomic(self.path / MANIFEST, m)

    def finish(self) -> ActivationCache:
        self.manifest["complete"] = True
        write_json_atomic(self.path / MANIFEST, self.manifest)
        return ActivationCache(self.path, self.manifest)
