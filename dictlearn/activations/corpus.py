"""Read a text corpus and pack it into fixed-length token sequences.

Sources: local `.txt` (one document per file), `.jsonl` / `.jsonl.gz` (one JSON object per line) and
`.parquet` files, folders of them (read in sorted path order), or a Hugging Face dataset name (needs the
optional `datasets` extra). Documents are tokenised without special tokens, joined with the tokenizer's
end-of-text token and cut into sequences of `context_length` tokens; with `prepend_bos` each sequence
starts with the BOS token (that position is a special token and is later left out of the cache).

Packing is deterministic: sequence i is always the same tokens for the same corpus and tokenizer, so a
harvest can resume by skipping sequences instead of remembering reader state.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


class CorpusError(ValueError):
    """A corpus that cannot be read as configured."""


@dataclass
class CorpusConfig:
    """The `[corpus]` table of a run config."""

    path: str  # local file or folder, or a Hugging Face dataset name (needs the `datasets` extra)
    field: str = "text"  # JSON / parquet / dataset column holding the text
    context_length: int = 128  # tokens per packed sequence
    prepend_bos: bool | str = "auto"  # "auto" (when the tokenizer adds BOS itself), true or false
    dataset_config: str | None = None  # Hugging Face dataset configuration name
    split: str = "train"  # Hugging Face dataset split

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}")
        if str(self.prepend_bos).lower() not in ("auto", "true", "false"):
            raise ValueError(f"prepend_bos must be auto, true or false, got {self.prepend_bos!r}")
        self.prepend_bos = str(self.prepend_bos).lower()


def _has_suffix(p: Path) -> bool:
    return p.name.endswith(SUFFIXES)


def local_files(path: str | Path) -> list[Path]:
    """The corpus files at `path` (a file or a folder searched recursively), sorted; CorpusError if none."""
    p = Path(path).expanduser()
    if p.is_file():
        if not _has_suffix(p):
            raise CorpusError(f"corpus file {str(p)!r} has an unsupported type; use one of {', '.join(SUFFIXES)}")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _has_suffix(f))
        if not files:
            raise CorpusError(f"corpus folder {str(p)!r} holds no {', '.join(SUFFIXES)} files")
        return files
    raise CorpusError(
        f"corpus {str(p)!r} does not exist: give a local file or folder ({', '.join(SUFFIXES)}) "
        "or a Hugging Face dataset name (with the `datasets` extra installed)"
    )


def is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or _has_suffix(p)


def _field_of(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise CorpusError(f"{where}: has no field {field!r} (fields: {', '.join(record)}); set corpus.field")
    value = record[field]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    return value


def _read_file(f: Path, field: str) -> Iterator[str]:
    if f.name.endswith(".txt"):
        yield f.read_text(encoding="utf-8", errors="replace")
    elif f.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"{f}:{i + 1}: not valid JSON: {e}") from e
                    yield _field_of(record, field, f"{f}:{i + 1}")
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        if field not in pf.schema_arrow.names:
            raise CorpusError(f"{f}: has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); set corpus.field")
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)


def _read_hf(config: CorpusConfig) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(
            f"corpus {config.path!r} is not a local file or folder, and reading Hugging Face datasets needs the "
            "optional extra: pip install 'dictlearn[datasets]'"
        ) from e
    ds = datasets.load_dataset(config.path, config.dataset_config, split=config.split, streaming=True)
    for i, record in enumerate(ds):
        yield _field_of(record, config.field, f"{config.path}[{i}]")


def documents(config: CorpusConfig) -> Iterator[str]:
    """The corpus's documents as strings, in a fixed order."""
    if is_local(config.path):
        for f in local_files(config.path):
            yield from _read_file(f, config.field)
    else:
        yield from _read_hf(config)


def check_corpus(config: CorpusConfig, n_docs: int = 16) -> None:
    """Read the corpus's first `n_docs` documents: a missing path, a wrong `field` or an empty corpus fails
    here, before a harvest creates its cache folder (which would then refuse the corrected config)."""
    seen = filled = 0
    for doc in documents(config):  # a record without `field` raises CorpusError naming it
        seen += 1
        filled += bool(doc.strip())
        if seen >= n_docs:
            break
    if not seen:
        raise CorpusError(f"corpus {config.path!r} holds no documents; give a corpus with text in it")
    if not filled:
        raise CorpusError(
            f"the first {seen} document(s) of corpus {config.path!r} have no text in field {config.field!r}; "
            "check corpus.field"
        )


def fingerprint(config: CorpusConfig) -> str:
    """Identifies the corpus content (file names, sizes and hashes; or the dataset name) and its field."""
    h = hashlib.sha256(f"field={config.field}".encode())
    if is_local(config.path):
        from dictlearn.activations.models import file_fingerprint

        root = Path(config.path).expanduser()
        for f in local_files(config.path):
            rel = f.name if f == root else str(f.relative_to(root))
            h.update(f"{rel}:{file_fingerprint(f)}".encode())
        return "local:" + h.hexdigest()[:16]
    h.update(f"{config.path}/{config.dataset_config}/{config.split}".encode())
    return "hf:" + h.hexdigest()[:16]


def _wants_bos(tokenizer, setting: str) -> bool:
    if setting != "auto":
        return setting == "true" and tokenizer.bos_token_id is not None
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def packed_sequences(config: CorpusConfig, tokenizer, start: int = 0, doc_batch: int = 64) -> Iterator[np.ndarray]:
    """Yield (context_length,) int32 token arrays: sequence `start`, `start + 1`, ... until the corpus ends.

    Documents are joined with the end-of-text token (EOS, else BOS); with BOS prepended, each sequence
    holds BOS + context_length - 1 corpus tokens."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    bos = tokenizer.bos_token_id if _wants_bos(tokenizer, config.prepend_bos) else None
    body = config.context_length - (bos is not None)
    buf: list[int] = []
    index = 0

    def flush() -> Iterator[np.ndarray]:
        nonlocal buf, index
        n = len(buf) // body
        for k in range(n):
            if index >= start:
                chunk = buf[k * body : (k + 1) * body]
                yield np.asarray(([bos] if bos is not None else []) + chunk, dtype=np.int32)
            index += 1
        del buf[: n * body]

    pending: list[str] = []
    for doc in documents(config):
        pending.append(doc)
        if len(pending) == doc_batch:
            for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
                buf.extend(ids)
                if sep is not None:
                    buf.append(sep)
            pending = []
            yield from flush()
    if pending:
        for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            if sep is not None:
                buf.append(sep)
        yield from flush()


def special_token_ids(tokenizer) -> np.ndarray:
    """Ids of the tokenizer's special tokens (BOS, EOS, padding, chat markers, ...)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            ids.add(int(v))
    return np.asarray(sorted(ids), dtype=np.int32)
