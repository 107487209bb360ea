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

Nothing is used silently: `check_folder` accounts for every data file against the manifest (an unlisted
shard, a gap, a wrong total is refused), `verify` adds sizes, headers and checksums, and
`shard_arrays(k, verify=True)` checks a shard's sha256 on the one read that uses it.

Where a cache is read from: a local folder (shards memory-mapped), or a URL read through fsspec
(`memory://`, `file://`, and `s3://`, `gs://`, ... when the matching fsspec package is installed), with the
same checks and errors; a URL read fetches only the byte ranges of the arrays asked for. Caches are
written to local folders only (harvest locally, then copy the folder to shared or object storage).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dictlearn.files import LOCK_FILE, FolderLock, atomic_write_bytes, atomic_write_json, sha256_file

FORMAT = "dictlearn-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROW_KEYS = ("token_id", "seq", "pos")  # row-aligned metadata stored beside the activations
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "U16": np.uint16, "I16": np.int16}


class CacheError(RuntimeError):
    """A cache folder that is missing, incomplete, corrupt, or not what the caller expects."""


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*(?:::[A-Za-z][A-Za-z0-9+.-]*)*)://")  # also chained: simplecache::s3://


def is_url(location: str | Path) -> bool:
    """True for "scheme://..." strings (read through fsspec); a Path or a plain path is a local folder."""
    return isinstance(location, str) and _URL.match(location) is not None


def _mangled_url(path: Path) -> bool:
    """A URL that went through Path(), which folds "s3://b" into "s3:/b": never a folder anyone meant."""
    return _URL.match(str(path).replace(":/", "://", 1)) is not None and not Path(path).is_absolute()


_DATA_FILE = re.compile(r"(shard-\d+.*|.*\.(safetensors|npy|npz))$")  # what a cache folder's data files look like


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _np_dtype(code: str):
    if code == "BF16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if code not in _ST_DTYPES:
        raise CacheError(f"unsupported tensor dtype {code!r} in a shard")
    return _ST_DTYPES[code]


def _parse_header(read_at: Callable[[int, int], bytes], size: int, name: str) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file of `size` bytes read through `read_at(offset, n)`."""
    head = read_at(0, 8)
    if len(head) < 8:
        raise CacheError(f"{name}: truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 << 20:
        raise CacheError(f"{name}: truncated or corrupt (header length {n} > file size {size})")
    try:
        header = json.loads(read_at(8, n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{name}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CacheError(f"{name}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise CacheError(f"{name}: truncated or padded: header says {8 + n + end} bytes, file has {size}")
    return 8 + n, header


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file; CacheError if the file is cut short or garbled."""
    with open(path, "rb") as f:

        def read_at(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        return _parse_header(read_at, path.stat().st_size, path.name)


def to_float32(a: np.ndarray) -> np.ndarray:
    """Cast a stored float16/bfloat16/float32 array to float32 (bfloat16 by a bit shift: exact and fast)."""
    if a.dtype == np.float32:
        return np.array(a, dtype=np.float32, copy=True)
    if a.dtype.name == "bfloat16":  # bfloat16 is the top half of a float32
        out = np.empty(a.shape, dtype=np.uint32)
        np.left_shift(a.view(np.uint16), 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    return a.astype(np.float32)


class _LocalFolder:
    """A cache folder on this machine: shards are memory-mapped (nothing is read until indexed)."""

    def __init__(self, root: Path):
        self.root = root

    def exists(self) -> bool:
        return self.root.exists()

    def is_file(self, name: str) -> bool:
        return (self.root / name).is_file()

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def read_text(self, name: str) -> str:
        return (self.root / name).read_text()

    def read_all(self, name: str, size: int) -> bytearray:
        buf = bytearray(size)
        with open(self.root / name, "rb", buffering=0) as f:
            view, got = memoryview(buf), 0
            while got < size and (n := f.readinto(view[got:])):
                got += n
        return buf if got == size else buf[:got]

    def header(self, name: str) -> tuple[int, dict]:
        return read_safetensors_header(self.root / name)

    def region(self, name: str) -> Callable[[int, int], np.ndarray]:
        data = np.memmap(self.root / name, dtype=np.uint8, mode="r")
        return lambda start, stop: data[start:stop]

    def names(self) -> set[str]:
        return {f.name for f in self.root.iterdir() if f.is_file()}

    def sha256(self, name: str) -> str:
        return sha256_file(self.root / name)


class _FsspecFolder:
    """A cache folder behind a URL, read through fsspec: byte ranges for arrays, whole files for checksums."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = _filesystem(self.url)
        self.root = self.root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _do(self, what: str, fn: Callable, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise CacheError(f"could not {what} {self.url}: {e}") from e

    def exists(self) -> bool:
        return bool(self._do("reach", self.fs.exists, self.root))

    def is_file(self, name: str) -> bool:
        return bool(self._do("read", self.fs.isfile, self._path(name)))

    def size(self, name: str) -> int:
        return int(self._do("read", self.fs.size, self._path(name)))

    def read_text(self, name: str) -> str:
        return self._do("read", self.fs.cat_file, self._path(name)).decode()

    def read_all(self, name: str, size: int) -> bytes:
        return self._do("read", self.fs.cat_file, self._path(name))

    def _range(self, name: str, start: int, stop: int) -> bytes:
        return self._do("read", self.fs.cat_file, self._path(name), start, stop)

    def header(self, name: str) -> tuple[int, dict]:
        return _parse_header(lambda o, n: self._range(name, o, o + n), self.size(name), name)

    def region(self, name: str) -> Callable[[int, int], np.ndarray]:
        return lambda start, stop: np.frombuffer(self._range(name, start, stop), dtype=np.uint8)

    def names(self) -> set[str]:
        entries = self._do("list", self.fs.ls, self.root, True)
        return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"}

    def sha256(self, name: str) -> str:
        def stream() -> str:
            digest = hashlib.sha256()
            with self.fs.open(self._path(name), "rb") as f:
                while chunk := f.read(1 << 23):
                    digest.update(chunk)
            return digest.hexdigest()

        return self._do("read", stream)


def _filesystem(url: str):
    """(fsspec file system, path inside it) for a URL; CacheError naming the package a scheme needs."""
    scheme = _URL.match(url).group(1)
    try:
        import fsspec
    except ImportError:
        raise CacheError(f"reading a cache from {scheme}:// needs fsspec: pip install fsspec") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        package = _missing_package(scheme)
        if package is None:
            raise CacheError(f"reading a cache from {scheme}:// URLs failed to import its fsspec file system: {e}") from None
        raise CacheError(f"reading a cache from {scheme}:// URLs needs the {package} package, which is not "
                         f"installed: pip install {package}") from None
    except ValueError as e:
        raise CacheError(f"{url}: no fsspec file system reads {scheme}:// URLs ({e}); use a local folder, or "
                         f"install the fsspec package for that storage") from None


def _missing_package(scheme: str) -> str | None:
    """The package (named as pip installs it) of the first protocol in `scheme` ("s3", "simplecache::gs") that is
    not installed, from fsspec's registry of implementations."""
    import importlib.util

    from fsspec.registry import known_implementations

    for protocol in scheme.split("::"):
        module = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
        if module and importlib.util.find_spec(module) is None:
            return module
    return None


class ActivationCache:
    """Read access to a cache (use `ActivationCache.open`). `path` is the local folder, or the URL it was
    opened from."""

    def __init__(self, path: Path | str, manifest: dict, folder: _LocalFolder | _FsspecFolder | None = None):
        self.path = path
        self.manifest = manifest
        self._folder = folder or _LocalFolder(Path(path))

    @classmethod
    def open(cls, path: str | Path) -> "ActivationCache":
        """The cache at a local folder or a URL (fsspec); CacheError when it is missing or not a cache."""
        if is_url(path):
            folder, where = _FsspecFolder(str(path)), str(path).rstrip("/")
        else:
            folder = _LocalFolder(Path(path))
            where = folder.root
        mf = f"{where}/{MANIFEST}"
        try:
            present = folder.is_file(MANIFEST)
        except FileNotFoundError:
            present = False
        if not present:
            hint = " (a harvest writes it: dictlearn harvest CONFIG.toml)" if not folder.exists() else ""
            raise CacheError(f"{str(where)!r} is not an activation cache: {MANIFEST} is missing{hint}")
        try:
            manifest = json.loads(folder.read_text(MANIFEST))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{mf}: corrupt manifest ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CacheError(f"{mf}: not a dictlearn activation cache manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{mf}: cache format version {manifest.get('format_version')} is not supported "
                f"(this dictlearn reads version {FORMAT_VERSION}); harvest it again"
            )
        return cls(where, manifest, folder)

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
    def shard_arrays(self, index: int, keys: list[str] | None = None, verify: bool = False) -> dict[str, np.ndarray]:
        """Arrays of shard `index` in their stored dtype.

        Without `verify` a local shard is memory-mapped (no read until indexed) and a URL's shard is read
        array by array (only the byte ranges of `keys`). With `verify` the whole file is read once into
        memory and its sha256 checked against the manifest before any array is returned (the same bytes are
        hashed and used, so nothing is read twice); a mismatch raises CacheError naming the shard."""
        info = self.shards[index]
        name = info["file"]
        if not self._folder.is_file(name):
            raise CacheError(f"{name}: listed in the manifest but missing; rerun the harvest or `dictlearn cache verify`")
        if verify:
            buf = self._read_checked(info)
            start, header = _parse_header(lambda o, n: bytes(buf[o : o + n]), len(buf), name)
            data = np.frombuffer(buf, dtype=np.uint8)
            region = lambda a, b: data[a:b]  # noqa: E731
        else:
            start, header = self._folder.header(name)
            region = self._folder.region(name)
        wanted = keys if keys is not None else list(header)
        out = {}
        for k in wanted:
            if k not in header:
                raise CacheError(f"{name}: has no array {k!r}; stored: {', '.join(sorted(header))}")
            t = header[k]
            a, b = t["data_offsets"]
            out[k] = region(start + a, start + b).view(_np_dtype(t["dtype"])).reshape(t["shape"])
        return out

    def _read_checked(self, info: dict) -> bytearray | bytes:
        """The bytes of a shard, read once, after checking their size and sha256 against the manifest."""
        size = self._folder.size(info["file"])
        if size != info["bytes"]:
            raise CacheError(f"{info['file']} in {self.path}: truncated or altered: {size} bytes, the manifest says "
                             f"{info['bytes']}; harvest the cache again")
        buf = self._folder.read_all(info["file"], size)
        if len(buf) != size or hashlib.sha256(buf).hexdigest() != info["sha256"]:
            raise CacheError(f"{info['file']} in {self.path}: corrupt: its sha256 does not match the manifest; "
                             "harvest the cache again (or restore the file)")
        return buf

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
    def check_folder(self) -> None:
        """Account for the manifest's shard list and every data file in the folder (cheap: no shard is read).

        Raises CacheError naming every problem: a shard file in the folder that the manifest does not list
        (e.g. an entry deleted from manifest.json), a listed shard whose file is missing, gaps or disorder in
        the shard numbering or sequence ranges, splits that disagree with `eval_shards`, fewer shards than
        planned in a finished cache, and row or token totals that are not the sum of the shards'. Dotfiles
        (the lock) and temporary files of an interrupted write are not data and are left alone."""
        m, problems = self.manifest, []
        listed = {s["file"] for s in self.shards}
        prev_stop = 0
        per_shard = m.get("sequences_per_shard")
        eval_ids = set(m["eval_shards"]) if "eval_shards" in m else None
        for k, s in enumerate(self.shards):
            if s["file"] != shard_name(k) or s.get("index", k) != k:
                problems.append(f"entry {k} of the shard list is {s['file']} (index {s.get('index')}), not {shard_name(k)}: "
                                f"the listed shards skip or reorder numbers")
                break
            if s["seq_start"] > prev_stop:
                problems.append(f"sequences {prev_stop}-{s['seq_start'] - 1} are in no listed shard (gap before {s['file']})")
            elif s["seq_start"] < prev_stop and per_shard:
                problems.append(f"{s['file']} starts at sequence {s['seq_start']}, inside the previous shard's range")
            if per_shard and (s["seq_start"] != k * per_shard or s["tokens"] != (s["seq_stop"] - s["seq_start"]) * self.context_length):
                problems.append(f"{s['file']} holds sequences {s['seq_start']}-{s['seq_stop'] - 1} ({s['tokens']} tokens), "
                                f"not the planned range from {k * per_shard}")
            if eval_ids is not None and s["split"] != ("eval" if k in eval_ids else "train"):
                problems.append(f"{s['file']} is marked {s['split']!r} but the planned eval shards are {sorted(eval_ids)}")
            prev_stop = max(prev_stop, s["seq_stop"])
        if self.complete and len(self.shards) != m.get("n_shards_planned"):
            problems.append(f"the finished cache lists {len(self.shards)} shards but {m.get('n_shards_planned')} were planned")
        for total, part in (("n_rows", "rows"), ("n_tokens", "tokens")):
            got = sum(s[part] for s in self.shards)
            if total in m and self.shards and m[total] != got:
                problems.append(f"its {total} is {m[total]:,} but its shards hold {got:,} {part}")
        present = self._folder.names()
        pending = shard_name(len(self.shards)) if not self.complete else None  # a write a kill interrupted
        unlisted = sorted(n for n in present - listed
                          if _DATA_FILE.match(n) and ".tmp" not in n and n != pending)
        if unlisted:
            shown = ", ".join(unlisted[:8]) + (f" and {len(unlisted) - 8} more" if len(unlisted) > 8 else "")
            problems.append(f"{shown} {'is' if len(unlisted) == 1 else 'are'} in the folder but not listed in {MANIFEST}")
        missing = sorted(listed - present)
        if missing:
            problems.append(f"{', '.join(missing[:8])} {'is' if len(missing) == 1 else 'are'} listed but missing from the folder")
        if problems:
            raise CacheError(
                f"{self.path}: {MANIFEST} does not account for the cache: " + "; ".join(problems)
                + ". Training or evaluating on it would silently use the wrong rows: restore the folder or harvest it again "
                "into an empty folder"
            )

    def verify(self, checksums: bool = True) -> None:
        """Raise CacheError naming the first problem: an unfinished harvest, a folder the manifest does not
        account for (`check_folder`), a missing, truncated or corrupt shard (sizes, headers, shapes, and with
        `checksums` the sha256 of every shard)."""
        if not self.complete:
            raise CacheError(
                f"{self.path}: the harvest is unfinished ({len(self.shards)} of {self.manifest.get('n_shards_planned')} "
                "shards); run the same `dictlearn harvest` command again to finish it"
            )
        self.check_folder()
        widths = {k: v["width"] for k, v in self.hookpoints.items()}
        for info in self.shards:
            name = info["file"]
            if not self._folder.is_file(name):
                raise CacheError(f"{name}: missing from {self.path}")
            size = self._folder.size(name)
            if size != info["bytes"]:
                raise CacheError(f"{name}: truncated or altered: {size} bytes, manifest says {info['bytes']}")
            _, header = self._folder.header(name)
            for k, w in widths.items():
                shape = header.get(k, {}).get("shape")
                if shape != [info["rows"], w]:
                    raise CacheError(f"{name}: array {k!r} has shape {shape}, expected {[info['rows'], w]}")
            if checksums and self._folder.sha256(name) != info["sha256"]:
                raise CacheError(f"{name}: corrupt: sha256 does not match the manifest")

    def summary(self) -> str:
        """What `dictlearn cache info` prints: model, corpus, counts (with what each exclusion rule left out), shards."""
        m = self.manifest
        lines = [
            f"cache      {self.path}" + ("" if self.complete else "  (UNFINISHED)"),
            f"model      {m['model']['name']}  [{m['model']['fingerprint']}]",
            f"corpus     {m['corpus']['config']['path']}  [{m['corpus']['fingerprint']}]",
            f"context    {self.context_length} tokens; {m['n_tokens']:,} tokens read, {self.n_rows:,} rows stored"
            + _left_out_note(m),
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
        _check_local(path)
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
            # temp files of a write a kill interrupted; under the folder's lock (re-entrant for a harvest that
            # already holds it), so another live process's file in mid-write is never removed
            with FolderLock(path, "an activation cache write"):
                for stale in path.glob("*.tmp*"):
                    stale.unlink(missing_ok=True)
            return cls(path, old)
        cls.check_new_folder(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {**manifest, "shards": [], "complete": False}
        atomic_write_json(mf, manifest)
        return cls(path, manifest)

    @staticmethod
    def check_new_folder(path: Path) -> None:
        """Refuse a folder that holds other files but no manifest (never harvest into someone's data), and a URL."""
        _check_local(path)
        if path.exists() and not (path / MANIFEST).is_file() and any(f.name != LOCK_FILE for f in path.iterdir()):
            raise CacheError(f"{path} exists and is not empty but holds no {MANIFEST}; choose an empty or new folder")

    @property
    def n_done(self) -> int:
        return len(self.manifest["shards"])

    def add_shard(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Write the next shard atomically, then list it (with rows, bytes, sha256) in the manifest."""
        from safetensors.numpy import save

        index = self.n_done
        payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        name = shard_name(index)
        atomic_write_bytes(self.path / name, payload)
        entry = {"file": name, "index": index, **info, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        m = self.manifest
        m["shards"].append(entry)
        m["n_rows"] = sum(s["rows"] for s in m["shards"])
        m["n_tokens"] = sum(s["tokens"] for s in m["shards"])
        atomic_write_json(self.path / MANIFEST, m)

    def finish(self) -> ActivationCache:
        self.manifest["complete"] = True
        atomic_write_json(self.path / MANIFEST, self.manifest)
        return ActivationCache(self.path, self.manifest)


def _check_local(path: str | Path) -> None:
    """Caches are written to local folders only: a URL (or one that went through Path()) is refused."""
    if is_url(path) or (isinstance(path, Path) and _mangled_url(path)):
        raise CacheError(f"{path}: a cache is written to a local folder, not a URL; harvest into a local folder, "
                         "then copy it to shared or object storage (e.g. `gsutil -m cp -r` or `aws s3 sync`) and "
                         "point train.cache at the URL to read it there")


def _left_out_note(manifest: dict) -> str:
    """' (left out: 262 sink, 78 special)': the harvest's per-rule counts, when it recorded them."""
    counts = {rule: n for rule, n in (manifest.get("left_out") or {}).items() if n}
    if counts:
        return " (left out: " + ", ".join(f"{n:,} {rule}" for rule, n in counts.items()) + ")"
    return " (special tokens left out)" if manifest.get("excluded_token_ids") else ""
