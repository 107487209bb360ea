"""Read a text corpus and pack it into fixed-length token sequences.

Sources: local `.txt` (one document per file), `.jsonl` / `.jsonl.gz` (one JSON object per line) and
`.parquet` files, folders of them (read in sorted path order), or a Hugging Face dataset name (needs the
optional `datasets` extra). Documents are tokenised without special tokens, joined with the tokenizer's
end-of-text token and cut into sequences of `context_length` tokens; with `prepend_bos` each sequence
starts with the BOS token (that position is a special token and is later left out of the cache).

With `mode = "chat"` the records hold `messages` (a list of {"role", "content"}) and each conversation is
rendered with the tokenizer's own chat template into its own sequence (never packed with another): shorter
ones are padded at the end, longer ones truncated or split (`overflow`). Per token, the role of the message
it belongs to is found by rendering the conversation's prefixes (the template renders messages[:i] as a
prefix of messages[:i+1]); only the tokens of `roles` are cached, and of those only the messages' own text
unless `template_tokens` keeps the template's markers and role headers too. Padding is never cached.

`left_out` is the one place that decides which positions of a sequence are left out of a cache (padding,
other roles, special tokens, the attention-sink position 0): the harvest, the downstream loss and, through
the cache's rows, the feature cards all use it.

Sequence order is deterministic: sequence i is always the same tokens for the same corpus and tokenizer, so a
harvest can resume by skipping sequences instead of remembering reader state.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
MODES = ("packed", "chat")
OVERFLOWS = ("truncate", "split")


class CorpusError(ValueError):
    """A corpus that cannot be read as configured."""


@dataclass
class CorpusConfig:
    """The `[corpus]` table of a run config."""

    path: str  # local file or folder, or a Hugging Face dataset name (needs the `datasets` extra)
    field: str | None = None  # JSON / parquet / dataset column: default "text" (packed) or "messages" (chat)
    context_length: int = 128  # tokens per sequence
    prepend_bos: bool | str = "auto"  # packed: "auto" (when the tokenizer adds BOS itself), true or false
    dataset_config: str | None = None  # Hugging Face dataset configuration name
    split: str = "train"  # Hugging Face dataset split
    mode: str = "packed"  # "packed" (documents joined and cut) or "chat" (one conversation per sequence)
    roles: list[str] = dataclass_field(default_factory=lambda: ["assistant"])  # chat: whose tokens are cached
    template_tokens: bool = False  # chat: also cache the template's markers and role headers of those turns
    overflow: str = "truncate"  # chat: a conversation longer than context_length is "truncate"d or "split"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"corpus.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"corpus.overflow must be one of {', '.join(OVERFLOWS)}, got {self.overflow!r}")
        if self.mode == "chat" and not self.roles:
            raise ValueError('corpus.roles is empty: name the roles whose tokens are cached, e.g. roles = ["assistant"]')
        if self.field is None:
            self.field = "messages" if self.mode == "chat" else "text"
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


def _field_of(record: dict, field: str, where: str, want: type = str) -> Any:
    if field not in record:
        raise CorpusError(f"{where}: has no field {field!r} (fields: {', '.join(record)}); set corpus.field")
    value = record[field]
    if not isinstance(value, want):
        what = "text" if want is str else "a list of messages"
        raise CorpusError(f"{where}: field {field!r} is {type(value).__name__}, not {what}")
    return value


def _read_file(f: Path, field: str, want: type = str) -> Iterator[Any]:
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
                    yield _field_of(record, field, f"{f}:{i + 1}", want)
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        if field not in pf.schema_arrow.names:
            raise CorpusError(f"{f}: has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); set corpus.field")
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)


def _want(config: CorpusConfig) -> type:
    return list if config.mode == "chat" else str


def _read_hf(config: CorpusConfig) -> Iterator[Any]:
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(
            f"corpus {config.path!r} is not a local file or folder, and reading Hugging Face datasets needs the "
            "optional extra: pip install 'dictlearn[datasets]'"
        ) from e
    ds = datasets.load_dataset(config.path, config.dataset_config, split=config.split, streaming=True)
    for i, record in enumerate(ds):
        yield _field_of(record, config.field, f"{config.path}[{i}]", _want(config))


def documents(config: CorpusConfig) -> Iterator[Any]:
    """The corpus's documents in a fixed order: strings, or (chat mode) lists of messages."""
    if is_local(config.path):
        for f in local_files(config.path):
            yield from _read_file(f, config.field, _want(config))
    else:
        yield from _read_hf(config)


def check_corpus(config: CorpusConfig, n_docs: int = 16) -> None:
    """Read the corpus's first `n_docs` documents: a missing path, a wrong `field` or an empty corpus fails
    here, before a harvest creates its cache folder (which would then refuse the corrected config)."""
    seen = filled = 0
    for doc in documents(config):  # a record without `field` raises CorpusError naming it
        seen += 1
        filled += bool(doc.strip()) if isinstance(doc, str) else bool(doc)
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
        nonlocal index
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


# --- chat mode ---------------------------------------------------------------------------------------------------
class Sequence(NamedTuple):
    """One sequence of a corpus: (context_length,) int32 `tokens`, the bool `content` mask of positions whose
    tokens may be cached (chat: the chosen roles' tokens; packed: every position) and the number of real
    (not padding) tokens."""

    tokens: np.ndarray
    content: np.ndarray
    length: int


def _render(tokenizer, messages: list) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def chat_tokens(tokenizer, messages: list, config: CorpusConfig, where: str = "a conversation") -> tuple[np.ndarray, np.ndarray]:
    """(token ids, content mask) of one conversation rendered with the tokenizer's chat template; the mask
    marks the tokens of `config.roles` (their messages' text, plus the template's tokens of those turns when
    `config.template_tokens`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError(f"corpus.mode = \"chat\" needs a tokenizer with a chat template, and {type(tokenizer).__name__} "
                          "has none; use an instruct model's tokenizer or corpus.mode = \"packed\"")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise CorpusError(f"{where}: every message must be {{\"role\": str, \"content\": str}}, got {str(m)[:80]!r}")
    text = _render(tokenizer, messages)
    bounds = [0]  # message i owns text[bounds[i]:bounds[i + 1]]
    for i in range(1, len(messages) + 1):
        prefix = text if i == len(messages) else _render(tokenizer, messages[:i])
        if not text.startswith(prefix):
            raise CorpusError(f"{where}: the chat template does not render the first {i} message(s) as a prefix of the "
                              "whole conversation, so tokens cannot be assigned to roles; use corpus.mode = \"packed\"")
        bounds.append(len(prefix))
    spans = []  # (start, stop) of each message's own text
    for i, m in enumerate(messages):
        at = text.find(m["content"], bounds[i], bounds[i + 1])
        if at < 0:
            raise CorpusError(f"{where}: message {i}'s text is not in its rendering by the chat template")
        spans.append((at, at + len(m["content"])))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    content = np.zeros(len(ids), dtype=bool)
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        i = max(0, int(np.searchsorted(bounds, a, side="right")) - 1)
        if i >= len(messages) or messages[i]["role"] not in config.roles:
            continue
        s, e = spans[i]
        content[j] = config.template_tokens or (a < e and b > s)
    return ids, content


def chat_sequences(config: CorpusConfig, tokenizer, start: int = 0) -> Iterator[Sequence]:
    """One Sequence per conversation (or per piece of a split one), padded at the end: sequence `start`, ..."""
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None))
    T, index = config.context_length, 0
    for n, messages in enumerate(documents(config)):
        ids, content = chat_tokens(tokenizer, messages, config, where=f"{config.path} conversation {n}")
        stops = range(0, len(ids), T) if config.overflow == "split" else range(0, min(len(ids), 1))
        for a in stops:
            if index >= start:
                piece, mask = ids[a : a + T], content[a : a + T]
                tokens = np.full(T, pad, dtype=np.int32)
                tokens[: len(piece)] = piece
                full = np.zeros(T, dtype=bool)
                full[: len(mask)] = mask
                yield Sequence(tokens, full, len(piece))
            index += 1


def sequences(config: CorpusConfig, tokenizer, start: int = 0) -> Iterator[Sequence]:
    """The corpus's sequences from `start` on, in either mode."""
    if config.mode == "chat":
        yield from chat_sequences(config, tokenizer, start)
        return
    everything = np.ones(config.context_length, dtype=bool)
    for tokens in packed_sequences(config, tokenizer, start):
        yield Sequence(tokens, everything, config.context_length)


# --- which positions a cache leaves out ------------------------------------------------------------------------
LEFT_OUT_RULES = ("padding", "other_roles", "special_tokens", "sink")


def left_out(tokens: np.ndarray, excluded_token_ids=(), skip_sink: bool = False, content: np.ndarray | None = None,
             lengths: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """(keep mask, tokens left out per rule) for (n, T) `tokens`. Rules, each position counted under the first
    that applies: padding (position >= the sequence's length), other_roles (outside `content`), special_tokens
    (ids in `excluded_token_ids`: BOS, EOS, `<unk>`, ...), sink (position 0, which the model uses as an attention
    sink when no BOS is there to be one)."""
    tokens = np.atleast_2d(np.asarray(tokens))
    n, T = tokens.shape
    pos = np.broadcast_to(np.arange(T), (n, T))
    masks = {
        "padding": pos >= (np.asarray(lengths)[:, None] if lengths is not None else T),
        "other_roles": ~np.asarray(content, dtype=bool).reshape(n, T) if content is not None else np.zeros((n, T), bool),
        "special_tokens": np.isin(tokens, np.asarray(list(excluded_token_ids), dtype=np.int64)),
        "sink": (pos == 0) & bool(skip_sink),
    }
    taken = np.zeros((n, T), dtype=bool)
    counts = {}
    for rule in LEFT_OUT_RULES:
        new = masks[rule] & ~taken
        counts[rule] = int(new.sum())
        taken |= new
    return ~taken, counts
