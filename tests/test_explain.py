"""pellucid explain: the data is the model's own math, and every view renders the same data."""

import dataclasses
import itertools
import json
import math
import shutil
import subprocess

import pytest
import torch

from pellucid import cli
from pellucid.config import to_dict
from pellucid.explain import render
from pellucid.explain.trace import SCHEMA, explain
from pellucid.explain.train_step import explain_train
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS
from pellucid.model.layers import Dropout, explicit_attention
from pellucid.model.transformer import Trace, Transformer
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.weights.checkpoint import save_checkpoint

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog."


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT] * 4, 300, special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=300, pos=request.param)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def data(model, tok):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.8, min_p=0.02, seed=3)
    return explain(model, tok, "the cat sat on the", params, steps=4)


def test_schema_keys_are_stable(data, model):
    required = {"schema", "prompt", "model", "tokens", "embeddings", "positions", "attention"}
    required |= {"logit_lens", "next_token", "cost", "sampling", "steps"}
    assert required <= set(data)
    assert data["schema"] == SCHEMA
    assert set(data["tokens"][0]) >= {"index", "id", "text", "bytes"}
    assert set(data["next_token"]["top"][0]) >= {"id", "text", "logprob", "prob", "logit"}
    assert set(data["logit_lens"][0]["top"][0]) >= {"id", "text", "prob"}
    T = len(data["tokens"])
    assert len(data["attention"]) == model.cfg.n_layer
    assert len(data["attention"][0]["heads"]) == model.cfg.n_head
    assert all(
        len(h["weights"]) == T and len(h["weights"][0]) == T for h in data["attention"][0]["heads"]
    )
    json.dumps(data)  # plain JSON, no tensors


def test_tokens_round_trip_the_prompt(data, tok):
    ids = [t["id"] for t in data["tokens"]]
    assert ids == tok.encode("the cat sat on the")
    assert (
        b"".join(bytes.fromhex(t["bytes"]) for t in data["tokens"]).decode() == "the cat sat on the"
    )


def test_attention_rows_are_causal_and_sum_to_one(data):
    for layer in data["attention"]:
        for head in layer["heads"]:
            for i, row in enumerate(head["weights"]):
                assert sum(row) == pytest.approx(1, abs=1e-3)
                assert all(w == 0 for w in row[i + 1 :])


def test_explicit_attention_times_v_reproduces_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    out, weights = explicit_attention(q, k, v, None)
    fast = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(out, fast, atol=1e-5, rtol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 7))


def test_traced_forward_equals_fast_forward(model):
    ids = torch.randint(0, 300, (1, 9))
    traced = model(ids, trace=Trace())
    torch.testing.assert_close(traced, model(ids), atol=1e-5, rtol=1e-5)


def test_logit_lens_at_the_last_layer_is_the_models_output(data, model, tok):
    ids = torch.tensor([[t["id"] for t in data["tokens"]]])
    probs = model(ids)[0, -1].softmax(-1)
    last = data["logit_lens"][-1]["top"]
    p, i = probs.topk(len(last))
    assert [r["id"] for r in last] == i.tolist()
    assert [r["prob"] for r in last] == pytest.approx(p.tolist(), abs=1e-4)
    assert data["logit_lens"][0]["label"] == "embeddings"
    assert len(data["logit_lens"]) == model.cfg.n_layer + 1
    assert [r["id"] for r in data["next_token"]["top"][: len(last)]] == i.tolist()


def test_each_filter_keeps_a_renormalized_subset(data):
    stages = data["next_token"]["stages"]
    assert [s["name"] for s in stages] == ["softmax", "top_k", "top_p", "min_p", "temperature"]
    kept = [s["kept"] for s in stages]
    assert kept[0] == 300 and kept[1] == 40
    assert all(a >= b for a, b in itertools.pairwise(kept))
    for s in stages[1:]:
        assert s["sum"] == pytest.approx(1, abs=1e-4)
    chosen = data["next_token"]["chosen"]
    assert chosen["id"] in {r["id"] for r in stages[-2]["top"]} or stages[-2]["kept"] > len(
        stages[-2]["top"]
    )


def test_greedy_choice_is_the_argmax(model, tok):
    d = explain(model, tok, "a dog", SamplingParams(temperature=0))
    assert d["next_token"]["chosen"]["id"] == d["next_token"]["top"][0]["id"]
    assert d["next_token"]["chosen"]["prob"] == 1.0


def test_steps_show_the_kv_cache_growing(data, model):
    steps = data["steps"]
    T = len(data["tokens"])
    assert [s["kv_cache_tokens"] for s in steps] == [T, T + 1, T + 2, T + 3]
    per = data["cost"]["kv_cache_bytes_per_token"]
    assert per == 2 * model.cfg.n_layer * model.cfg.n_kv_head * model.cfg.head_dim * 4
    assert [s["new_tokens_computed"] for s in steps] == [T, 1, 1, 1]


def test_positions_section(data, model):
    p = data["positions"]
    assert p["scheme"] == model.cfg.pos
    if p["scheme"] == "rope":
        assert len(p["angles_last"]) == model.cfg.head_dim // 2
        assert p["angles_last"][0] == pytest.approx(p["last_position"])  # frequency 1 at i = 0
    else:
        assert len(p["norms"]) == len(data["tokens"])


def test_too_long_and_empty_prompts_are_one_line_errors(model, tok):
    from pellucid.errors import ConfigError

    with pytest.raises(ConfigError, match="at least one token"):
        explain(model, tok, "")
    with pytest.raises(ConfigError, match="up to"):
        explain(model, tok, "cat " * 200)


def test_terminal_png_and_html_views(data, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=200)
    render.terminal(data, console)
    text = console.export_text()
    for heading in ("tokenization", "attention", "logit lens", "output", "cost", "generation"):
        assert heading in text
    paths = render.save_pngs(data, tmp_path / "png")
    assert {p.name for p in paths} >= {"attention_layer00.png", "logit_lens.png", "next_token.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    render.save_html(data, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    for section in (
        "tokens",
        "positions",
        "attention",
        "logit-lens",
        "next-token",
        "cost",
        "steps",
    ):
        assert f'id="{section}"' in page
    assert "<script" not in page and "http" not in page.replace("charset", "")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=300)
    root = tmp_path_factory.mktemp("run")
    files = {
        "config.json": json.dumps({"model": to_dict(cfg)}),
        "tokenizer.json": (root / "t.json"),
    }
    tok.save(root / "t.json")
    files["tokenizer.json"] = (root / "t.json").read_text()
    save_checkpoint(root, 1, Transformer(cfg), None, {"step": 1}, files)
    return root


def test_cli_json_and_html(run_dir, tmp_path, capsys):
    html_file = tmp_path / "x.html"
    assert (
        cli.main(
            [
                "explain",
                "--model",
                str(run_dir),
                "--json",
                "--html",
                str(html_file),
                "--steps",
                "2",
                "the cat",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == SCHEMA and len(out["steps"]) == 2
    assert html_file.is_file()


def test_cli_terminal(run_dir, capsys):
    assert cli.main(["explain", "--model", str(run_dir), "the dog"]) == 0
    assert "logit lens" in capsys.readouterr().out


@pytest.mark.slow
def test_headless_browser_renders_the_heatmap(data, tmp_path):
    browser = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    if browser is None:
        pytest.skip("no headless browser (install Debian's chromium)")
    import matplotlib.image

    render.save_html(data, tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            (tmp_path / "r.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]  # (H, W, 3) in [0, 1]
    # viridis heatmap cells are saturated greens/blues/purples: far from white, grey and black
    spread = pixels.max(-1) - pixels.min(-1)
    assert (spread > 0.3).mean() > 0.01, "no coloured heatmap pixels in the screenshot"


# --- explain-train ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_data(tok):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=300)
    model = Transformer(cfg)
    before = {n: p.clone() for n, p in model.named_parameters()}
    data = explain_train(model, tok, "the cat sat on the mat. the dog", lr=1e-3, dropout=0.5)
    return model, before, data


def test_loss_per_position_is_cross_entropy(step_data, tok):
    _model, _, data = step_data
    ids = tok.encode("the cat sat on the mat. the dog")
    assert [r["target"] for r in data["loss_per_position"]] == [tok.decode([i]) for i in ids[1:]]
    losses = [r["loss"] for r in data["loss_per_position"]]
    assert data["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    for r in data["loss_per_position"]:
        assert r["prob"] == pytest.approx(math.exp(-r["loss"]), rel=1e-3)


def test_the_step_leaves_the_model_unchanged(step_data):
    model, before, _ = step_data
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    drops = [m for m in model.modules() if isinstance(m, (torch.nn.Dropout, Dropout))]
    assert drops and all(m.p == 0.0 for m in drops)


def test_first_adam_step_moves_each_weight_by_about_lr(step_data):
    # AdamW's first step: m_hat / sqrt(v_hat) = g / |g| = +-1, so every weight with a gradient
    # moves by lr (plus lr * wd * w for decayed matrices): |update| ~ lr * sqrt(numel).
    model, _, data = step_data
    sizes = {}
    for n, p in model.named_parameters():
        part = (
            "final norm"
            if n.startswith("norm")
            else ("embeddings" if n.startswith("tok_emb") else None)
        )
        if part:
            sizes[part] = sizes.get(part, 0) + p.numel()
    by_part = {u["part"]: u for u in data["updates"]}
    assert by_part["final norm"]["update_norm"] == pytest.approx(
        1e-3 * math.sqrt(sizes["final norm"]), rel=0.02
    )
    assert all(u["ratio"] > 0 for u in data["updates"])
    assert {g["part"] for g in data["grad_norms"]} >= {"layer 0", "layer 1", "embeddings"}


def test_dropout_zeroes_about_p(step_data):
    _, _, data = step_data
    total = sum(d["zeroed"] for d in data["dropout_zeroed"])
    elements = sum(d["elements"] for d in data["dropout_zeroed"])
    assert 0.45 < total / elements < 0.55


def test_explain_train_cli(run_dir, capsys):
    assert cli.main(["explain-train", "--model", str(run_dir), "--json", "the cat sat"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == "pellucid.explain-train/1" and out["loss"] > 0
    assert cli.main(["explain-train", "--model", str(run_dir), "the cat sat"]) == 0
    assert "dropout" in capsys.readouterr().out
    assert cli.main(["explain-train", "--model", str(run_dir), "a"]) == 2


def test_docs_list_every_key(data, step_data):
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "explain.md").read_text()
    first, second = doc.split("## Schema `pellucid.explain-train/1`")

    def keys(section):
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        return {
            k
            for row in rows
            for k in row.split("|")[1].replace("`", "").replace(" ", "").split(",")
        }

    assert keys(first) == set(data)
    assert keys(second) == set(step_data[2])
