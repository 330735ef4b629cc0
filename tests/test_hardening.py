"""Issue 16 items 1-3: each failure the black-box probe found, reproduced through the CLI.

Every case must end in one `pellucid: error: ...` line (exit 2) that names the file, field or flag,
before any real work and within seconds: no traceback, no hang, no allocation the input asked for.
The probe's classes: wrong-shaped JSON, a model path that is a FIFO or a device, hostile chat
templates, bad values reaching deep code, resumed state.json of the wrong shape, output paths
that are files or folders, and a full disk during a write (slow: a child under RLIMIT_FSIZE).
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from finetune_helpers import base_run, write_jsonl

from pellucid.cli import main
from pellucid.errors import CheckpointError, DataError
from pellucid.files import sha256_file
from pellucid.weights.resolve import load


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return base_run(tmp_path_factory.mktemp("base") / "run")


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory):
    from pellucid.weights.hf import save_hf

    loaded = load(run_dir)
    return save_hf(loaded.model, tmp_path_factory.mktemp("hf") / "hf", tokenizer=loaded.tokenizer)


@contextmanager
def within(seconds):
    """Fail (rather than hang the suite) when the block runs past `seconds`."""

    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - start < seconds


def one_line_error(argv, capsys, seconds=30):
    """Run the CLI; assert exit 2 and a single error line; return that line."""
    capsys.readouterr()
    with within(seconds):
        assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("pellucid: error: "), err
    assert "Traceback" not in "\n".join(err) and "--debug" not in err[-1]
    return err[-1]


def copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_json(path, change):
    data = json.loads(path.read_text())
    data = change(data)
    path.write_text(json.dumps(data))


def reseal(ckpt):
    """Rewrite a checkpoint's manifest after an edit, so only the edited content is wrong."""
    m = json.loads((ckpt / "manifest.json").read_text())
    for name in m["files"]:
        f = ckpt / name
        m["files"][name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(m))


def step_dir(run):
    return next((run / "checkpoints").iterdir())


# --- item 1: every JSON file we read is checked against its shape at the boundary ---------------


def _set(key, value):
    def change(d):
        d[key] = value
        return d

    return change


JSON_CASES = {
    # (which file of which model, how it is changed, the words of the error)
    "manifest is a list": ("run", "manifest.json", lambda d: [1, 2], "top level must be an object"),
    "manifest file entry is a list": (
        "run", "manifest.json", lambda d: {**d, "files": {**d["files"], "state.json": [1]}},
        "field 'files.state.json' must be an object",
    ),
    "manifest step is a string": ("run", "manifest.json", _set("step", "5"), "field 'step'"),
    "run config model is a list": ("run", "config.json", _set("model", [1]), "field 'model'"),
    "HF architectures is a string": (
        "hf", "config.json", _set("architectures", "LlamaForCausalLM"), "field 'architectures'"
    ),
    "HF rope_parameters is a list": (
        "hf", "config.json", _set("rope_parameters", [1]), "field 'rope_parameters'"
    ),
    "HF layer count is a string": (
        "hf", "config.json", _set("num_hidden_layers", "2"), "'n_layer': expects an integer"
    ),
    "tokenizer_config not JSON": ("hf", "tokenizer_config.json", None, "not valid JSON"),
    "tokenizer_config eos is a list": (
        "hf", "tokenizer_config.json", _set("eos_token", [1]), "field 'eos_token'"
    ),
    "chat_template list without default": (
        "hf", "tokenizer_config.json", _set("chat_template", [{"name": "tool_use", "template": "x"}]),
        "no 'default' template",
    ),
    "pre_tokenizer is a list": (
        "hf", "tokenizer.json", _set("pre_tokenizer", [1]), "field 'pre_tokenizer' must be an object"
    ),
    "added_tokens is an object": (
        "hf", "tokenizer.json", _set("added_tokens", {"a": 1}), "field 'added_tokens' must be a list"
    ),
    "vocab is a list": (
        "hf", "tokenizer.json", lambda d: {**d, "model": {**d["model"], "vocab": [1]}},
        "field 'model.vocab'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", JSON_CASES)
def test_wrong_shaped_json_is_one_line_naming_the_field(case, run_dir, hf_dir, tmp_path, capsys):
    kind, name, change, words = JSON_CASES[case]
    model = copy_folder(run_dir if kind == "run" else hf_dir, tmp_path / "m")
    target = (step_dir(model) if kind == "run" else model) / name
    if change is None:
        target.write_text("not json {")
    else:
        edit_json(target, change)
    if kind == "run" and name != "manifest.json":
        reseal(step_dir(model))
    err = one_line_error(["generate", "--chat", "--model", str(model), "hi"], capsys)
    assert words in err and name in err


def test_a_finetune_meta_of_the_wrong_shape_names_the_field(run_dir, tmp_path, capsys):
    model = copy_folder(run_dir, tmp_path / "m")
    meta = {"format": "pellucid-finetune/1", "base": str(run_dir), "base_sha256": "0" * 64,
            "task": "sft", "method": "lora", "lora": {"targets": ["q_proj"], "rank": "8", "alpha": 16}}  # fmt: skip
    (step_dir(model) / "finetune.json").write_text(json.dumps(meta))
    reseal_with = json.loads((step_dir(model) / "manifest.json").read_text())
    reseal_with["files"]["finetune.json"] = {}
    (step_dir(model) / "manifest.json").write_text(json.dumps(reseal_with))
    reseal(step_dir(model))
    err = one_line_error(["generate", "--model", str(model), "hi"], capsys)
    assert "finetune.json: field 'lora.rank' must be an integer" in err


def test_a_prepared_manifest_of_the_wrong_shape_names_the_field(tmp_path):
    from pellucid.data.stream import open_prepared

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "pellucid-prepared/1",
                                                        "dtype": "uint16", "shards": {}}))  # fmt: skip
    with pytest.raises(DataError, match="field 'tokenizer_sha256' is missing"):
        open_prepared(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "pellucid-prepared/1", "dtype": "int3"')
    with pytest.raises(DataError, match="not valid JSON"):
        open_prepared(str(tmp_path))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_model_path_that_is_a_fifo_or_a_device_is_refused_without_opening(kind, tmp_path, capsys):
    path = "/dev/zero" if kind == "device" else str(tmp_path / "model.gguf")
    if kind == "fifo":
        os.mkfifo(path)  # opening it to read would block for ever
    err = one_line_error(["generate", "--model", path, "hi"], capsys, seconds=10)
    assert "not a regular file or folder" in err


def test_a_10000_layer_config_is_refused_in_seconds_before_any_tensor(hf_dir, tmp_path, capsys):
    model = copy_folder(hf_dir, tmp_path / "m")
    edit_json(model / "config.json", _set("num_hidden_layers", 10_000))
    err = one_line_error(["generate", "--model", str(model), "hi"], capsys, seconds=10)
    assert "missing: model.layers.2." in err  # the file holds 2 layers: named, not allocated


# --- item 2: hostile chat templates in a model file -----------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 10**10 }}",  # a 10 GB string
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    ],
)
def test_a_hostile_gguf_chat_template_stops_with_one_line(template, run_dir, tmp_path, capsys):
    from pellucid.weights.gguf import save_gguf

    loaded = load(run_dir)
    path = save_gguf(loaded.model, tmp_path / "m.gguf", tokenizer=loaded.tokenizer,
                     chat_template=template)  # fmt: skip
    err = one_line_error(["generate", "--chat", "--model", str(path), "hi"], capsys, seconds=20)
    assert "chat template stopped" in err


# --- item 1/3: bad values stop at the boundary, naming the flag or key ----------------------------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--lr", "nan"], "lr (the learning rate)"),  # was raised from inside torch's AdamW
        (["--lr", "-1"], "lr (the learning rate)"),
        (["--weight-decay", "nan"], "weight_decay"),
    ],
)
def test_explain_train_checks_its_flags(flags, words, run_dir, capsys):
    err = one_line_error(["explain-train", "--model", str(run_dir), "hi there", *flags], capsys)
    assert words in err


@pytest.mark.parametrize("value", ["5", '["tiny"]', "{ name = 'tiny' }"])
def test_a_preset_of_the_wrong_type_names_the_key(value, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(f"[model]\npreset = {value}\n")
    err = one_line_error(["train", "--config", str(tmp_path / "run.toml")], capsys)
    assert "'model.preset' expects a preset name" in err


def test_finetune_refuses_a_batch_or_lora_rank_that_cannot_fit(run_dir, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(8)]
    )
    base = ["finetune", "sft", "--model", str(run_dir), "--data", str(data)]
    err = one_line_error(
        [*base, "--out", str(tmp_path / "a"), "train.batch_size=100000000"], capsys
    )
    assert "GB to train" in err and "train.batch_size=100000000" in err
    err = one_line_error(
        [*base, "--lora", "--out", str(tmp_path / "b"), "lora.rank=100000000"], capsys
    )
    assert "lora.rank must be at most 64" in err


# --- resuming from a state.json of the wrong shape ------------------------------------------------


def _resumable(tmp_path):
    from test_trainer import run

    run(tmp_path, max_steps=2, checkpoint_every=2)
    return step_dir(tmp_path)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda s: s["train_state"].update(step="2"),
            "field 'train_state.step' must be an integer",
        ),
        (lambda s: s["rng"].pop("numpy"), "field 'rng.numpy' is missing"),
        (lambda s: s.pop("rng"), "field 'rng' is missing"),
        (lambda s: s["rng"].update(torch=[1, 2]), "field 'rng' does not restore"),
        (
            lambda s: s["optimizer"].update(param_groups=5),
            "'optimizer.param_groups' must be a list",
        ),
        (lambda s: s["optimizer"].update(param_groups=[]), "optimizer state does not fit"),
    ],
)
def test_resume_from_a_wrong_shaped_state_json_names_the_field(change, words, tmp_path):
    from test_trainer import run

    ckpt = _resumable(tmp_path)
    edit_json(ckpt / "state.json", lambda s: (change(s), s)[1])
    reseal(ckpt)
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(")):
        run(tmp_path, resume=True, max_steps=4)


# --- item 3: output paths checked before any work -------------------------------------------------


def _out_cases(run, data):
    m = ["--model", str(run)]
    return {
        "export gguf": ["export", *m, "--format", "gguf", "--out"],
        "export hf": ["export", *m, "--format", "hf", "--out"],
        "explain --png": ["explain", *m, "hi", "--png"],
        "explain --html": ["explain", *m, "hi", "--html"],
        "tokenizer train": ["tokenizer", "train", "--corpus", str(data), "--vocab-size", "300", "--out"],
        "data prepare": ["data", "prepare", str(data), "--tokenizer", str(run), "--out"],
        "data tasks": ["data", "tasks", "arith", "--n", "3", "--out"],
        "train": ["train", "--out"],
        "demo": ["demo", "--out"],
        "finetune": ["finetune", "sft", *m, "--data", str(data), "--out"],
    }  # fmt: skip


FILE_OUTS = {"export gguf", "explain --html", "data tasks"}  # the others make a folder


@pytest.mark.parametrize("verb", list(_out_cases("r", "d")))
@pytest.mark.parametrize("where", ["wrong kind", "under a file"])
def test_output_paths_are_checked_before_work(verb, where, run_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": "p", "completion": "c"}])
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "adir").mkdir()
    if where == "under a file":
        out, words = tmp_path / "afile" / "x", "is a file, so nothing can be made under it"
    elif verb in FILE_OUTS:
        out, words = tmp_path / "adir", "is a folder; give a file name"
    else:
        out, words = tmp_path / "afile", "is a file; give a folder"
    argv = _out_cases(run_dir, data)[verb] + [str(out)]
    assert words in one_line_error(argv, capsys, seconds=20)
    assert (tmp_path / "afile").read_text() == "keep" and not any((tmp_path / "adir").iterdir())


# --- item 3: a full disk during any write keeps the old file and says so in one line ------------

DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    from pellucid.cli import main
    sys.exit(main({argv!r}))
    """
)


def run_disk_full(argv, limit, cwd):
    code = DISK_FULL.format(limit=limit, argv=[str(a) for a in argv])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("pellucid: error: "), proc.stderr
    return lines[-1]


@pytest.mark.slow
def test_a_full_disk_during_any_write_keeps_the_old_file(run_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and ran far away from home\n" * 40)
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(8)]
    )
    old = {"old.gguf": b"old gguf", "oldhf/config.json": b"{}", "tok/tokenizer.json": b"{}",
           "tasks.jsonl": b"old tasks\n"}  # fmt: skip
    for name, content in old.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    m = ["--model", str(run_dir)]
    cases = [  # (argv, RLIMIT_FSIZE bytes, the words that say what survived)
        (["export", *m, "--format", "gguf", "--out", "old.gguf"], 50_000, "previous file is intact"),
        (["export", *m, "--format", "hf", "--out", "oldhf"], 50_000, "intact|nothing was written"),
        (["tokenizer", "train", "--corpus", corpus, "--vocab-size", "300", "--out", "tok"], 2_000,
         "previous file is intact"),
        (["data", "prepare", corpus, "--tokenizer", run_dir, "--out", "prep"], 200, "nothing was written"),
        (["data", "tasks", "arith", "--n", "2000", "--out", "tasks.jsonl"], 5_000, "previous file is intact"),
        (["finetune", "sft", *m, "--data", data, "--out", "ft", "train.max_steps=2"], 50_000,
         "previous checkpoint is intact"),
        (["train", "--out", "run", "model.preset=tiny", f"data.corpus={corpus}", "data.vocab_size=260",
          "train.max_steps=400", "train.batch_size=2", "train.device=cpu", "train.eval_every=0",
          "train.checkpoint_every=1000"], 8_000, "metrics.jsonl.*records before are intact"),
    ]  # fmt: skip
    for argv, limit, words in cases:
        line = run_disk_full(argv, limit, tmp_path)
        assert re.search("[Ff]ile too large|disk full", line), line
        assert re.search(words, line), line
    for name, content in old.items():  # byte for byte what was there before
        assert (tmp_path / name).read_bytes() == content, name
    assert not (tmp_path / "prep").exists()
    assert not list(tmp_path.rglob(".*tmp*")), "a temp file was left behind"
