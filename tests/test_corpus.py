"""Corpus reading (every local format, folders, errors) and packing into fixed-length sequences."""

from __future__ import annotations

import builtins
import gzip
import json

import numpy as np
import pytest

from dictlearn.activations.corpus import (
    CorpusConfig,
    CorpusError,
    documents,
    fingerprint,
    local_files,
    packed_sequences,
    special_token_ids,
)

DOCS = [
    "The committee met on Tuesday to discuss the harbour plans.",
    "Rain fell steadily over the valley; farmers welcomed it after a long dry spell.",
    "A new telescope recorded faint light from a galaxy billions of years old.",
    "Shares rose two per cent as the bank reported higher profits.",
] * 3


def _write_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS)))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(DOCS):
        (txt / f"{i:02d}.txt").write_text(d)
    return tmp_path


def test_every_format_reads_the_same_documents(tmp_path):
    root = _write_formats(tmp_path)
    for name in ("a.jsonl", "a.jsonl.gz", "a.parquet", "txt"):
        assert list(documents(CorpusConfig(path=str(root / name), field="body"))) == DOCS, name


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("ignored")
    assert [f.name for f in local_files(tmp_path)] == ["a.txt", "x.txt"]
    assert list(documents(CorpusConfig(path=str(tmp_path)))) == ["first", "second"]


def test_packing_joins_documents_with_eos_and_cuts_fixed_lengths(tmp_path, smol):
    tok = smol.tokenizer
    root = _write_formats(tmp_path)
    cfg = CorpusConfig(path=str(root / "a.jsonl"), field="body", context_length=16)
    seqs = list(packed_sequences(cfg, tok, doc_batch=5))
    stream = []
    for d in DOCS:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(seqs) == len(stream) // 16
    assert np.array_equal(np.concatenate(seqs), np.asarray(stream[: 16 * len(seqs)]))
    assert all(s.shape == (16,) and s.dtype == np.int32 for s in seqs)
    # starting later skips exactly that many sequences
    later = list(packed_sequences(cfg, tok, start=3))
    assert len(later) == len(seqs) - 3 and all(np.array_equal(a, b) for a, b in zip(later, seqs[3:]))


def test_prepend_bos(tmp_path, smol):
    tok = smol.tokenizer  # SmolLM2's tokenizer adds no BOS itself, so "auto" leaves it out
    root = _write_formats(tmp_path)
    auto = next(packed_sequences(CorpusConfig(path=str(root / "a.jsonl"), field="body", context_length=8), tok))
    on = list(packed_sequences(CorpusConfig(path=str(root / "a.jsonl"), field="body", context_length=8, prepend_bos="true"), tok))
    assert auto[0] != tok.bos_token_id
    assert all(s[0] == tok.bos_token_id for s in on)
    assert np.array_equal(on[0][1:], auto[:7])


def test_special_token_ids_cover_bos_eos_pad(smol):
    ids = set(special_token_ids(smol.tokenizer).tolist())
    assert {smol.tokenizer.bos_token_id, smol.tokenizer.eos_token_id, smol.tokenizer.pad_token_id, 0} <= ids


def test_fingerprint_tracks_content_and_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "one"}) + "\n")
    a = fingerprint(CorpusConfig(path=str(p)))
    assert fingerprint(CorpusConfig(path=str(p))) == a
    assert fingerprint(CorpusConfig(path=str(p), field="body")) != a
    p.write_text(json.dumps({"text": "two"}) + "\n")
    assert fingerprint(CorpusConfig(path=str(p))) != a


def test_bad_paths_and_fields_give_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        list(documents(CorpusConfig(path=str(tmp_path / "missing.jsonl"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        list(documents(CorpusConfig(path=str(tmp_path / "empty"))))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="unsupported type"):
        list(documents(CorpusConfig(path=str(tmp_path / "x.csv"))))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(CorpusError, match="has no field 'text'.*corpus.field"):
        list(documents(CorpusConfig(path=str(tmp_path / "d.jsonl"))))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CorpusError, match="bad.jsonl:1: not valid JSON"):
        list(documents(CorpusConfig(path=str(tmp_path / "bad.jsonl"))))


def test_hub_dataset_without_the_extra_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(CorpusError, match=r"pip install 'dictlearn\[datasets\]'"):
        list(documents(CorpusConfig(path="someuser/some-dataset")))


def test_config_validation():
    with pytest.raises(ValueError, match="context_length"):
        CorpusConfig(path="x", context_length=1)
    with pytest.raises(ValueError, match="prepend_bos"):
        CorpusConfig(path="x", prepend_bos="maybe")
