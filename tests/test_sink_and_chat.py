"""Issue 13: the attention-sink position and outlier rows left out of caches; chat-mode corpora."""

import gzip
import json

import numpy as np
import pytest

from conftest import ASSETS, SplitIdentity

from dictlearn.activations.cache import ActivationCache, CacheError, to_float32
from dictlearn.activations.corpus import CorpusConfig, chat_sequences, chat_tokens, left_out
from dictlearn.activations.harvest import kept_positions
from dictlearn.eval.downstream import evaluate_downstream

CHAT = ASSETS / "chat-gsm8k-train.jsonl.gz"


def _conversations(n):
    with gzip.open(CHAT, "rt") as f:
        return [json.loads(next(f))["messages"] for _ in range(n)]


def test_left_out_counts_each_position_under_its_first_rule():
    tokens = np.array([[5, 1, 7, 9], [1, 8, 2, 2]])
    content = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)
    keep, counts = left_out(tokens, excluded_token_ids=[1, 2], skip_sink=True, content=content, lengths=np.array([4, 2]))
    assert keep.tolist() == [[False, False, False, True], [False, True, False, False]]
    assert counts == {"padding": 2, "other_roles": 1, "special_tokens": 2, "sink": 1}
    keep, counts = left_out(tokens, excluded_token_ids=[1, 2], skip_sink=False)
    assert keep.tolist() == [[True, False, True, True], [False, True, False, False]]
    assert counts["sink"] == 0 and counts["special_tokens"] == 4


def test_sink_rule_on_by_default_and_recorded(tiny_harvest, tmp_path):
    cache = tiny_harvest(out=tmp_path / "on")
    m = cache.manifest
    assert m["position_rules"]["skip_sink_positions"] is True
    assert m["identity"]["harvest"]["skip_sink_positions"] is True
    pos = np.concatenate([cache.shard_arrays(k, ["pos"])["pos"] for k in range(len(cache.shards))])
    assert pos.min() >= 1
    n_seq = m["n_tokens"] // cache.context_length
    assert m["left_out"]["sink"] == n_seq  # the SmolLM2 tokenizer adds no BOS: every sequence starts with a sink
    assert m["n_rows"] == m["n_tokens"] - sum(m["left_out"].values())

    off = tiny_harvest(out=tmp_path / "off", skip_sink_positions=False)
    pos = np.concatenate([off.shard_arrays(k, ["pos"])["pos"] for k in range(len(off.shards))])
    assert (pos == 0).sum() == n_seq  # the rows the rule leaves out, and nothing else
    assert off.manifest["left_out"]["sink"] == 0
    assert off.manifest["n_rows"] == m["n_rows"] + n_seq
    ids = cache.eval_sequences()
    keep = kept_positions(cache, ids, cache.sequence_tokens(ids))
    assert not keep[:, 0].any() and kept_positions(off, ids, off.sequence_tokens(ids))[:, 0].all()
    with pytest.raises(CacheError, match="skip_sink_positions"):
        tiny_harvest(out=tmp_path / "on", skip_sink_positions=False)


def test_outlier_filter_drops_rows_above_the_median_multiple(tiny_harvest, tmp_path):
    base = tiny_harvest(out=tmp_path / "base", skip_sink_positions=False)
    cut = tiny_harvest(out=tmp_path / "cut", skip_sink_positions=False, outlier_norm_factor=1.2)
    dropped = cut.manifest["left_out"]["outliers"]
    assert dropped > 0 and base.manifest["left_out"]["outliers"] == 0
    assert cut.manifest["n_rows"] == base.manifest["n_rows"] - dropped
    for k in range(len(cut.shards)):  # every kept row is within the factor of its shard's median (pre-filter)
        full = base.shard_arrays(k, ["resid_post.1"])["resid_post.1"]
        kept = cut.shard_arrays(k, ["resid_post.1"])["resid_post.1"]
        med = np.median(np.linalg.norm(to_float32(full), axis=1))
        assert np.linalg.norm(to_float32(kept), axis=1).max() <= 1.2 * med * (1 + 1e-6)


def test_chat_tokens_mark_only_the_chosen_roles(smol):
    tok = smol.tokenizer
    msgs = _conversations(3)
    cfg = CorpusConfig(path=str(CHAT), mode="chat")
    for m in msgs:
        ids, content = chat_tokens(tok, m, cfg)
        assert tok.decode(ids[content]) == m[1]["content"]
        user = CorpusConfig(path=str(CHAT), mode="chat", roles=["user"])
        ids, content = chat_tokens(tok, m, user)
        assert tok.decode(ids[content]) == m[0]["content"]
    ids, content = chat_tokens(tok, msgs[0], CorpusConfig(path=str(CHAT), mode="chat", template_tokens=True))
    assert tok.decode(ids[content]) == f"<|im_start|>assistant\n{msgs[0][1]['content']}<|im_end|>\n"


def test_chat_overflow_truncates_or_splits(smol):
    tok = smol.tokenizer
    ids, content = chat_tokens(tok, _conversations(1)[0], CorpusConfig(path=str(CHAT), mode="chat"))
    T = 48
    trunc = list(zip(range(2), chat_sequences(CorpusConfig(path=str(CHAT), mode="chat", context_length=T), tok)))
    assert trunc[0][1].length == T and (trunc[0][1].tokens == ids[:T]).all()
    split = [s for _, s in zip(range(len(ids) // T + 1), chat_sequences(
        CorpusConfig(path=str(CHAT), mode="chat", context_length=T, overflow="split"), tok))]
    joined = np.concatenate([s.tokens[: s.length] for s in split])
    assert (joined == ids).all() and (np.concatenate([s.content[: s.length] for s in split]) == content).all()
    assert not split[-1].content[split[-1].length:].any()  # padding is never content


def test_chat_harvest_from_the_cli_caches_only_assistant_tokens(smol, tmp_path, capsys):
    from dictlearn.cli.harvest import main

    out = tmp_path / "run"
    rc = main(["configs/chat_gsm8k.toml", "--set", f"out_dir={out}", "--set", "harvest.n_tokens=3072",
               "--set", "harvest.shard_mb=0.5", "--set", "harvest.eval_fraction=0.25"])
    assert rc in (0, None)
    cache = ActivationCache.open(out / "cache")
    cache.verify()  # the role masks and lengths stored beside sequence_tokens are arrays the cache reads
    m = cache.manifest
    assert m["identity"]["corpus"]["mode"] == "chat" and m["identity"]["corpus"]["roles"] == ["assistant"]
    assert m["left_out"]["padding"] > 0 and m["left_out"]["other_roles"] > 0
    tok = smol.tokenizer
    convs = _conversations(m["n_tokens"] // cache.context_length)
    for k in range(len(cache.shards)):
        a = cache.shard_arrays(k, ["token_id", "seq", "pos", "sequence_length"])
        start = cache.shards[k]["seq_start"]
        for s in np.unique(a["seq"]):
            rows = a["seq"] == s
            order = np.argsort(a["pos"][rows])
            assert a["pos"][rows].max() < a["sequence_length"][s - start]  # no padding row
            text = tok.decode(a["token_id"][rows][order])
            assert convs[s][1]["content"].startswith(text) and len(text) > 0
    # the downstream loss leaves out exactly the positions the harvest left out (one rule: corpus.left_out)
    ids = cache.eval_sequences()
    keep = kept_positions(cache, ids, cache.sequence_tokens(ids))
    k = next(i for i, sh in enumerate(cache.shards) if sh["split"] == "eval")
    a = cache.shard_arrays(k, ["seq", "pos"])
    cached = np.zeros_like(keep)
    cached[a["seq"] - ids[0], a["pos"]] = True
    assert (cached == keep).all()
    res = evaluate_downstream(smol.model, cache.sequence_tokens(ids[:2]), {"id": SplitIdentity(576, "resid_post.10")},
                              keep=keep[:2])["id"]
    assert res.n_tokens == keep[:2, :-1].sum() and abs(res.ce_spliced - res.ce_clean) < 1e-3
    capsys.readouterr()
    # a different role selection is refused on the same folder, with a sentence naming the setting
    assert main(["configs/chat_gsm8k.toml", "--set", f"out_dir={out}", "--set", "harvest.n_tokens=3072",
                 "--set", "harvest.shard_mb=0.5", "--set", "harvest.eval_fraction=0.25", "--set", 'corpus.roles=["user"]']) != 0
    assert "corpus.roles" in capsys.readouterr().err


def test_module_path_hookpoints_harvest_on_a_model_of_unknown_family(tiny_loaded, tmp_path):
    import torch
    from types import SimpleNamespace

    from dictlearn.activations.corpus import CorpusConfig
    from dictlearn.activations.harvest import HarvestConfig, harvest
    from dictlearn.activations.models import LoadedModel

    from conftest import CORPUS

    class Unknown(torch.nn.Module):  # no decoder-layer list any family entry knows
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(49152, 8)
            self.mix = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 49152)

        def forward(self, input_ids, **kwargs):
            return SimpleNamespace(logits=self.head(torch.relu(self.mix(self.embed(input_ids)))))

    torch.manual_seed(0)
    loaded = LoadedModel(model=Unknown().eval(), tokenizer=tiny_loaded.tokenizer, name="unknown", fingerprint="test:unknown")
    cache = harvest(loaded, CorpusConfig(path=str(CORPUS), context_length=32),
                    HarvestConfig(hookpoints=["mix"], n_tokens=256, dtype="float32", eval_fraction=0), tmp_path / "c",
                    progress=False)
    assert cache.manifest["model"]["n_layers"] is None
    assert cache.hookpoints["mix"]["width"] == 8 and cache.n_rows == 256 - cache.manifest["n_tokens"] // 32 - cache.manifest["left_out"]["special_tokens"]


def test_chat_settings_and_records_are_checked(smol):
    from dictlearn.activations.corpus import CorpusError

    with pytest.raises(ValueError, match="corpus.mode"):
        CorpusConfig(path=str(CHAT), mode="dialogue")
    with pytest.raises(ValueError, match="corpus.overflow"):
        CorpusConfig(path=str(CHAT), mode="chat", overflow="wrap")
    with pytest.raises(ValueError, match="roles"):
        CorpusConfig(path=str(CHAT), mode="chat", roles=[])
    assert CorpusConfig(path=str(CHAT), mode="chat").field == "messages" and CorpusConfig(path=str(CHAT)).field == "text"
    with pytest.raises(CorpusError, match="role"):
        chat_tokens(smol.tokenizer, [{"content": "no role"}], CorpusConfig(path=str(CHAT), mode="chat"))
    with pytest.raises(CorpusError, match="not a list of messages"):  # a packed corpus read as chat
        next(chat_sequences(CorpusConfig(path=str(ASSETS / "english-corpus.jsonl.gz"), mode="chat", field="text"),
                            smol.tokenizer))
