"""Data at scale: `data prepare` (text, JSONL, Parquet; parallel workers; manifest), streamed
shards with bounded memory, exact resume of the stream, and mixing prepared datasets by weight."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pellucid.cli import main
from pellucid.data.batches import WindowSampler
from pellucid.data.prepare import Options, _ShardWriter, prepare
from pellucid.data.stream import open_mix, open_prepared, parse_mix
from pellucid.errors import ConfigError, DataError
from pellucid.files import atomic_write, sha256_file
from pellucid.tokenizer.bpe import ENDOFTEXT, Tokenizer

WORDS = [
    "the",
    "king",
    "queen",
    "castle",
    "sword",
    "love",
    "death",
    "night",
    "day",
    "rose",
    "crown",
    "🌹",
    "é",
]


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 20)) for _ in range(n)]


@pytest.fixture
def tok_path(tmp_path):
    tok = Tokenizer.train(texts(50), 300, special_tokens=[ENDOFTEXT])
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    """A folder of text files, a JSONL file and a Parquet file of two row groups."""
    root = tmp_path / "corpus"
    (root / "txt").mkdir(parents=True)
    docs = texts(40, seed=1)
    for i, d in enumerate(docs[:10]):
        (root / "txt" / f"{i:02d}.txt").write_text(d)
    with open(root / "b.jsonl", "w") as f:
        for d in docs[10:25]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    table = pa.table({"content": docs[25:]})
    pq.write_table(table, root / "c.parquet", row_group_size=8)
    return root, docs


def read_all(folder):
    p = open_prepared(str(folder), check=True)
    return np.concatenate([p.val, p.train[0 : len(p.train)]]), p


def test_prepare_reads_text_jsonl_and_parquet_into_shards_with_a_manifest(
    tmp_path, tok_path, corpus
):
    root, docs = corpus
    out = tmp_path / "prep"
    m = prepare([str(root)], out, tok_path, workers=2, shard_tokens=500, val_tokens=100,
                opts=Options(field="body", column="content"))  # fmt: skip
    tok = Tokenizer.load(tok_path)
    sep = tok.special_tokens[ENDOFTEXT]
    # files in sorted order: b.jsonl, c.parquet, txt/00..09
    order = docs[10:25] + docs[25:] + docs[:10]
    expected = [i for d in order for i in [*tok.encode(d), sep]]
    stream, _ = read_all(out)
    assert stream.tolist() == expected
    assert m["documents"] == 40 and m["val_tokens"] == 100
    assert m["train_tokens"] + m["val_tokens"] == len(expected)
    assert all(s["tokens"] == 500 for s in m["shards"][:-1]) and m["shards"][-1]["tokens"] <= 500
    for s in m["shards"]:
        assert sha256_file(out / s["file"]) == s["sha256"]
    assert m["tokenizer_sha256"] and (out / "tokenizer.json").is_file()
    assert m["val_bytes"] == len(tok.decode_bytes(stream[:100].tolist())) - 0  # no specials
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".tmp-")]
    # the number of workers does not change a byte
    one = tmp_path / "one"
    prepare([str(root)], one, tok_path, workers=1, shard_tokens=500, val_tokens=100,
            opts=Options(field="body", column="content"))  # fmt: skip
    assert json.loads((one / "manifest.json").read_text())["shards"] == m["shards"]


def test_bad_inputs_are_one_line_errors_naming_the_culprit(tmp_path, tok_path, corpus):
    root, _ = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text'"):
        prepare([str(bad)], tmp_path / "o1", tok_path)
    with pytest.raises(DataError, match=r"no column 'text'.*--column"):
        prepare([str(root / "c.parquet")], tmp_path / "o2", tok_path, workers=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        prepare([str(root / "txt")], tmp_path / "full", tok_path)
    with pytest.raises(ConfigError, match=r"data\.mix"):
        parse_mix("a:0.7,b:-1")
    assert parse_mix("a:7,b") == [("a", 7.0), ("b", 1.0)]


def test_the_prepare_command(tmp_path, tok_path, corpus, capsys):
    root, _ = corpus
    out = tmp_path / "cli"
    argv = ["data", "prepare", str(root / "txt"), "--out", str(out), "--tokenizer", str(tok_path)]
    assert main([*argv, "--workers", "1", "--shard-tokens", "256"]) == 0
    assert "MB/s per worker" in capsys.readouterr().out
    assert open_prepared(str(out)).manifest["documents"] == 10


def write_prepared(folder, tokens, shard_tokens, val=()):
    """A prepared dataset with the given token stream (no tokenizer run: for size tests)."""
    folder.mkdir(parents=True)
    w = _ShardWriter(folder, np.dtype(np.uint16), shard_tokens, len(val))
    w.add(np.asarray([*val, *tokens], dtype=np.uint16).tobytes())
    v = w.close()
    atomic_write(folder / "tokenizer.json", "{}")
    manifest = {"format": "pellucid-prepared/1", "dtype": "uint16", "tokenizer_sha256": "t",
                "shards": w.shards, "val": v, "train_tokens": len(tokens), "val_tokens": len(val),
                "train_bytes": 0, "val_bytes": 0}  # fmt: skip
    atomic_write(folder / "manifest.json", json.dumps(manifest))
    return folder


def test_token_files_read_windows_across_shard_boundaries(tmp_path):
    tokens = np.arange(1000) % 60000
    p = open_prepared(str(write_prepared(tmp_path / "d", tokens, 64)))
    assert len(p.train) == 1000
    idx = np.array([[0], [60], [900]]) + np.arange(17)  # (3, 17), two cross a boundary
    assert np.array_equal(p.train[idx], tokens[idx])
    assert p.train[999] == 999 and np.array_equal(p.train[10:20], tokens[10:20])
    (tmp_path / "d" / "shard_00003.bin").write_bytes(b"xx")  # truncated
    with pytest.raises(DataError, match=r"shard_00003\.bin"):
        open_prepared(str(tmp_path / "d"))


def test_the_stream_resumes_at_the_exact_batch(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 300, 5000)
    p = open_prepared(str(write_prepared(tmp_path / "d", tokens, 700)))
    a = WindowSampler(p.train, 4, 16, seed=5)
    for _ in range(7):
        next(a)
    saved = a.state()
    expected = [next(a) for _ in range(3)]
    b = WindowSampler(open_prepared(str(tmp_path / "d")).train, 4, 16, seed=0)
    b.load_state(saved)
    for want in expected:
        got = next(b)
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)
    # and the streamed windows are the in-memory ones
    c = WindowSampler(tokens, 4, 16, seed=5)
    assert torch.equal(next(c).inputs, next(WindowSampler(p.train, 4, 16, seed=5)).inputs)


def test_mixing_draws_rows_by_weight(tmp_path):
    a = write_prepared(tmp_path / "a", np.full(3000, 7), 1000)  # every token of a is 7
    b = write_prepared(tmp_path / "b", np.full(3000, 9), 1000)
    datasets, weights = open_mix(f"{a}:0.7,{b}:0.3")
    s = WindowSampler([d.train for d in datasets], 16, 8, seed=1, weights=weights)
    rows = torch.cat([next(s).inputs[:, 0] for _ in range(400)])  # 6400 rows
    share = (rows == 7).float().mean().item()
    assert abs(share - 0.7) < 0.025  # 4 sigma of a binomial(6400, 0.7) share is 0.023
    assert set(rows.tolist()) == {7, 9}


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_a_corpus_ten_times_the_memory_cap_trains_within_it(tmp_path):
    import dataclasses

    from pellucid.model.config import PRESETS
    from pellucid.model.transformer import Transformer
    from pellucid.train.objectives import lm_loss
    from pellucid.train.trainer import TrainConfig, train

    n_tokens = 16 << 20  # 32 MiB of uint16 tokens on disk
    cap = 2 * n_tokens // 10  # a tenth of the corpus, in bytes
    tokens = np.random.default_rng(0).integers(0, 64, n_tokens, dtype=np.uint16)
    folder = write_prepared(tmp_path / "big", tokens, 1 << 20)
    del tokens
    p = open_prepared(str(folder))
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], dropout=0.0))
    sampler = WindowSampler(p.train, 8, 16, seed=0)
    cfg = TrainConfig(max_steps=3, batch_size=8, warmup_steps=1, eval_every=0, checkpoint_every=0,
                      device="cpu", dtype="float32", progress=False)  # fmt: skip
    train(model, lm_loss, sampler, cfg, tmp_path / "run")  # warm: allocator, first pages
    before = _rss_bytes()
    for _ in range(3000):  # 24,000 windows spread over the whole 32 MiB
        next(sampler)
    cfg = TrainConfig(**{**cfg.__dict__, "max_steps": 20})
    state = train(model, lm_loss, sampler, cfg, tmp_path / "run2")
    grew = _rss_bytes() - before
    assert grew < cap, f"RSS grew {grew / 1e6:.1f} MB over a {cap / 1e6:.1f} MB cap"
    assert p.train.max_bytes_held <= 8 * 17 * 2  # one batch of windows at a time
    assert state.step == 20


def test_pellucid_train_streams_a_prepared_mix(tmp_path, tok_path, corpus, capsys):
    root, _ = corpus
    for name in ("a", "b"):
        prepare([str(root / "txt")], tmp_path / name, tok_path, shard_tokens=300, val_tokens=200)
    run = tmp_path / "run"
    argv = ["train", "model.preset=tiny", f"data.mix={tmp_path / 'a'}:0.7,{tmp_path / 'b'}:0.3"]
    argv += ["train.max_steps=3", "train.batch_size=4", "train.device=cpu", "train.warmup_steps=1"]
    assert main([*argv, "--out", str(run)]) == 0
    assert "validation bits per byte" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["data"]["mix"].endswith("b:0.3")
    assert (run / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
