"""`pellucid ladder`: its outputs (ladder.json's schema, the PNG, the escaped HTML page) and the
whole ladder end to end on a tiny corpus, every rung on one split."""

import json
import random

import pytest

from pellucid.cli import main
from pellucid.data.shards import build_shards
from pellucid.data.sources import load_corpus
from pellucid.files import atomic_write
from pellucid.history.ladder import KINDS, Rung
from pellucid.history.report import page, write_outputs
from pellucid.recipes import demo_config, get_tokenizer, ladder
from pellucid.train.precision import machine_key, probe_path

KEYS = ["name", "kind", "bits_per_byte", "seconds", "size", "sample"]


def _rungs():
    evil = "<script>alert('x')</script> & \x1b[31m"
    return [
        Rung("uniform over bytes", "uniform", 8.0, 0.0, 256, [("KING.\n", evil)], "k"),
        Rung("2-gram", "ngram", 2.5, 1.25, 1000, [("KING.\n", "Enter</pre>")], "k"),
        Rung("vectors", "vectors", None, 3.0, 64, [], "k", text="king: <queen>"),
        Rung("transformer", "transformer", 2.0, 60.0, 10**6, [("KING.\n", "ok")], "k"),
    ]


def test_outputs_have_the_issue_schema_and_escape_every_text(tmp_path):
    write_outputs(tmp_path, _rungs())
    doc = json.loads((tmp_path / "ladder.json").read_text())
    assert list(doc) == ["rungs"]
    assert all(list(r) == KEYS for r in doc["rungs"])
    assert [r["kind"] for r in doc["rungs"]] == ["uniform", "ngram", "vectors", "transformer"]
    assert doc["rungs"][2]["bits_per_byte"] is None and doc["rungs"][2]["sample"] == "king: <queen>"
    assert doc["rungs"][1]["sample"] == "KING.\nEnter</pre>"
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "ladder.html").read_text()
    assert html == page(_rungs())
    assert "<script>" not in html and "&lt;script&gt;" in html and "Enter&lt;/pre&gt;" in html
    assert "king: &lt;queen&gt;" in html and "src=" not in html  # self-contained: nothing fetched


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = "the king and queen of the land walked to the castle where a knight spoke".split()
    lines = [" ".join(rng.choice(words) for _ in range(10)) + ".\n" for _ in range(1200)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines))
    return path


@pytest.mark.slow
def test_ladder_end_to_end_on_one_split(tmp_path, corpus, capsys):
    # Every rung, the trained transformer included, on the demo's split of this corpus. A probe
    # that says bf16 is 3x fp32 makes the demo train under bf16 autocast on any CPU: the ladder
    # scores it in fp32 all the same, so scoring it again below gives the same number (it gave
    # one 1e-4 apart, on the CPUs where `auto` picked bf16).
    probe = {"key": machine_key(), "peaks": {"float32": 1e11, "bfloat16": 3e11}}
    atomic_write(probe_path(machine_key()), json.dumps(probe))
    out = tmp_path / "ladder"
    rungs = ladder(str(corpus), 0.05, out)
    assert "bfloat16" in (out / "transformer" / "report.md").read_text()
    docs = load_corpus(str(corpus))
    data = demo_config(1.0, str(corpus)).data
    key = build_shards(docs, get_tokenizer(data, docs), data.val_fraction).meta["key"]
    assert {r.split for r in rungs} == {key}
    doc = json.loads((out / "ladder.json").read_text())
    assert doc == {"rungs": [r.to_json() for r in rungs]}
    kinds = [r["kind"] for r in doc["rungs"]]
    assert kinds == ["uniform", "unigram"] + ["ngram"] * 4 + ["vectors", "neural", "transformer"]
    assert set(kinds) == set(KINDS)
    for r in doc["rungs"]:
        assert r["kind"] == "vectors" or 0 < r["bits_per_byte"] <= 8, r
        assert r["size"] > 0 and r["seconds"] >= 0 and r["sample"]
    assert doc["rungs"][1]["bits_per_byte"] > min(r["bits_per_byte"] for r in doc["rungs"][2:6])
    for name in ("ladder.png", "ladder.html", "transformer/report.md", "neural/metrics.jsonl"):
        assert (out / name).is_file(), name

    # The CLI, scoring that transformer again as an existing run: the same number, in the table.
    again = tmp_path / "again"
    args = ["ladder", "--corpus", str(corpus), "--minutes", "0.05", "--out", str(again)]
    assert main([*args, "--run", str(out / "transformer")]) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "the best n-gram" in printed and "ladder.html" in printed
    top = json.loads((again / "ladder.json").read_text())["rungs"][-1]
    assert top["name"] == "transformer (transformer)"
    assert top["bits_per_byte"] == rungs[-1].bits_per_byte
    assert top["seconds"] == pytest.approx(rungs[-1].seconds, abs=0.01)
    assert not (again / "transformer").exists()  # nothing trained a second time
    assert main([*args]) == 2  # that folder now holds a ladder: refused before any work
    assert "already holds a ladder" in capsys.readouterr().err
