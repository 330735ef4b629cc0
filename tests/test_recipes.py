"""Run configs, `pellucid train` / `--resume` end to end on a tiny corpus, `pellucid demo`."""

import json
import shutil

import pytest
import torch

from pellucid.cli import main
from pellucid.errors import ConfigError
from pellucid.recipes import RunConfig, config_hash, load_run_config

TINY = [
    "model.preset=tiny", "model.context_len=32", "data.vocab_size=300", "train.max_steps=6",
    "train.batch_size=4", "train.eval_every=3", "train.checkpoint_every=3", "train.warmup_steps=2",
    "train.device=cpu", "train.progress=false", "train.eval_batches=2",
]  # fmt: skip


def test_preset_first_then_file_then_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny"\nn_layer = 3\n\n[train]\nmax_steps = 5\nlr = 0.01\n')
    run = load_run_config(toml, ["train.max_steps=7", "model.n_embd=32"])
    assert isinstance(run, RunConfig)
    assert (run.model.n_layer, run.model.n_embd, run.model.n_head) == (3, 32, 4)  # tiny's n_head
    assert run.model.head_dim == 8  # derived again from the new width, not tiny's 16
    assert (run.train.max_steps, run.train.lr) == (7, 0.01)
    assert load_run_config(None, ["model.preset=small"]).model.n_layer != 3
    assert config_hash(run) != config_hash(load_run_config(toml))


def test_unknown_keys_and_presets_suggest_the_right_one(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train\.max_step'.*'train\.max_steps'"
    ):
        load_run_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown model preset 'tinny'.*did you mean 'tiny'"):
        load_run_config(None, ["model.preset=tinny"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(bad)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.lr=fast", "train.lr"),
        ("train.compile=maybe", "train.compile"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.n_embd=100", "n_embd"),  # not a multiple of small's 6 heads
        ("model.n_kv_head=4", "n_kv_head"),  # 6 heads are not a multiple of 4
        ("data.vocab_size=big", "data.vocab_size"),
        ("data.vocab_size=100", "data.vocab_size"),
        # Each used to name the wrong thing: an empty corpus, and train.min_lr.
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("train.lr=-1", "'train.lr'"),
        ("train.lr=nan", "'train.lr'"),
        # These reached torch's AdamW (ValueError, IndexError) or trained with a negative decay.
        ("train.betas=[0.9]", "'train.betas'"),
        ("train.betas=[0.9,2]", "'train.betas'"),
        ("train.eps=-1", "'train.eps'"),
        ("train.weight_decay=-1", "'train.weight_decay'"),
    ],
)
def test_bad_values_name_the_key_in_one_line(override, key, capsys):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pellucid: error:") and key in err


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["train", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'train.lr'" in err


@pytest.fixture
def corpus(tmp_path):
    lines = [
        f"Line {i}: the quick brown fox jumps over the lazy dog number {i % 17}.\n"
        for i in range(600)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines))
    return path


def _run(tmp_path, corpus, *extra):
    run_dir = tmp_path / "run"
    code = main(["train", f"data.corpus={corpus}", *TINY, *extra, "--out", str(run_dir)])
    return code, run_dir


def test_train_end_to_end_writes_the_run_directory(tmp_path, corpus, capsys):
    code, run_dir = _run(tmp_path, corpus)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "validation bits per byte" in out and str(run_dir) in out
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "report.md"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["model"]["vocab_size"] == 300
    report = (run_dir / "report.md").read_text()
    for section in (
        "bits per byte",
        "parameters",
        "bytes per token",
        "FLOPs",
        "## Samples",
        "## Lineage",
        "MFU",
        "config sha256",
    ):
        assert section in report
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the run directory is a model spec
    from pellucid.weights.resolve import load_model

    model, tokenizer = load_model(run_dir)
    ids = torch.tensor([tokenizer.encode("Line 3: the quick")])
    assert model(ids).shape == (1, ids.shape[1], 300)


def test_train_resume_continues_and_matches_a_straight_run(tmp_path, corpus):
    straight = tmp_path / "straight"
    assert main(["train", f"data.corpus={corpus}", *TINY, "--out", str(straight)]) == 0
    code, run_dir = _run(tmp_path, corpus, "train.max_steps=3")
    assert code == 0
    # extend the same run to 6 steps: a new schedule, so compare only that it continued
    assert main(["train", "--resume", str(run_dir), "train.max_steps=6"]) == 0
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 3] and max(steps) == 6
    assert "step_000003" in (run_dir / "report.md").read_text()  # lineage: the parent checkpoint


def test_resume_without_a_good_checkpoint_fails_loudly(tmp_path, corpus, capsys):
    code, run_dir = _run(tmp_path, corpus, "train.max_steps=3", "train.checkpoint_every=0")
    assert code == 0
    for ckpt in (run_dir / "checkpoints").iterdir():
        (ckpt / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: log and warnings
    assert last.startswith("pellucid: error: --resume: no complete checkpoint")
    shutil.rmtree(run_dir / "checkpoints")
    assert main(["train", "--resume", str(run_dir)]) == 2


def test_fresh_run_refuses_an_existing_run_directory(tmp_path, corpus, capsys):
    assert _run(tmp_path, corpus, "train.max_steps=2")[0] == 0
    assert _run(tmp_path, corpus, "train.max_steps=2")[0] == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_short_run_end_to_end(tmp_path, real_home, capsys):
    """`pellucid demo` for a few seconds on the real Shakespeare corpus (fetched once, cached)."""
    out = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--- sample" in printed and "validation bits per byte" in printed
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_bpb"] for r in records if "val_bpb" in r]
    assert len(vals) >= 4 and vals[-1] < vals[0] < 8.5


def test_an_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys):
    import pellucid.cli.train as cli_train

    def boom(*args, **kwargs):
        raise RuntimeError("something\ninside broke")

    monkeypatch.setattr(cli_train, "cmd_demo", boom)
    monkeypatch.setattr("pellucid.recipes.demo", boom)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "RuntimeError: something inside broke" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main(["--debug", "demo"])


def test_an_empty_model_spec_is_an_error_not_the_default(capsys):
    assert main(["generate", "--model", "", "hi"]) == 2
    assert "empty model spec" in capsys.readouterr().err
