"""Checkpoints: round trip, safe contents (B3), corruption fallback (B4), disk full (B5), retention."""

import json
import logging
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from pellucid.errors import CheckpointError, CheckpointWriteError, TrainingError
from pellucid.weights.checkpoint import (
    checkpoint_dirs,
    latest_good,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify,
)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)))


def trained(seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.arange(10)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(run_dir, step, keep=3, model=None, opt=None):
    if model is None:
        model, opt = trained(step)
    files = {"config.json": json.dumps({"model": {"n": 1}}), "tokenizer.json": "{}"}
    state = {"sampler": {"pos": step}, "rng": rng_state()}
    return save_checkpoint(run_dir, step, model, opt, state, files, keep)


def test_round_trip_restores_weights_optimizer_and_state(tmp_path):
    model, opt = trained()
    path = save(tmp_path, 7, model=model, opt=opt)
    assert path.name == "step_000007" and verify(path)["step"] == 7
    fresh = Tied()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 7 and state["sampler"] == {"pos": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])
    assert fresh.head.weight is fresh.emb.weight  # still tied after loading
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["state"][i][k])
    with safe_open(path / "model.safetensors", "pt") as f:  # the tied weight is stored once
        assert sorted(f.keys()) == ["emb.weight", "norm.bias", "norm.weight"]


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))  # must survive plain JSON
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_b3_contents_are_safetensors_and_json_only(tmp_path):
    """Nothing a pickle loader is needed for: every file is JSON or safetensors."""
    path = save(tmp_path, 1)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "config.json", "manifest.json", "model.safetensors", "optim.safetensors", "state.json",
        "tokenizer.json",
    ]  # fmt: skip
    for p in path.iterdir():
        head = p.read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x04", b"PK")  # pickle protocols, torch's zip
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            with safe_open(p, "pt") as f:
                assert all(f.get_tensor(k).numel() >= 1 for k in f.keys())  # noqa: SIM118
    state = json.loads((path / "state.json").read_text())
    assert isinstance(state["rng"]["numpy"]["state"]["key"], list)  # not np.random.get_state()
    assert isinstance(state["rng"]["torch"], list)


def _corrupt(path, how):
    target = path / "model.safetensors"
    if how == "truncate_half":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif how == "truncate_zero":
        target.write_bytes(b"")
    elif how == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif how == "no_manifest":
        (path / "manifest.json").unlink()
    elif how == "bad_manifest":
        (path / "manifest.json").write_text("{not json")


@pytest.mark.parametrize(
    "how", ["truncate_half", "truncate_zero", "flip_byte", "no_manifest", "bad_manifest"]
)
def test_b4_corrupt_newest_falls_back_with_a_warning(tmp_path, caplog, how):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    _corrupt(newest, how)
    with caplog.at_level(logging.WARNING, logger="pellucid"):
        good = latest_good(tmp_path)
    assert good is not None and good.name == "step_000001"
    assert "step_000002" in caplog.text and "falling back" in caplog.text


def test_b4_no_good_checkpoint_is_none(tmp_path):
    _corrupt(save(tmp_path, 1), "flip_byte")
    assert latest_good(tmp_path) is None
    assert latest_good(tmp_path / "nowhere") is None


def test_retention_keeps_the_newest_k_and_cleans_leftovers(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_000009-123").mkdir(parents=True)  # a killed save
    for step in range(1, 6):
        save(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000004", "step_000005"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_resaving_a_step_replaces_the_old_folder(tmp_path):
    first = save(tmp_path, 3)
    _corrupt(first, "flip_byte")
    second = save(tmp_path, 3)
    assert first == second and verify(second)


def test_refuses_to_write_non_finite_tensors(tmp_path):
    model, opt = trained()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(
        TrainingError, match=r"refusing to write checkpoint step_000001: .*norm\.weight"
    ):
        save(tmp_path, 1, model=model, opt=opt)
    assert checkpoint_dirs(tmp_path) == []


def test_weights_that_do_not_fit_the_model_name_the_keys(tmp_path):
    path = save(tmp_path, 1)

    class Other(Tied):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match=r"missing \['extra.bias', 'extra.weight'\]"):
        load_checkpoint(path, Other())


CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import test_checkpoint as tc
    from pellucid.errors import CheckpointWriteError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))  # smaller than model.safetensors
    try:
        tc.save(Path({run_dir!r}), 2)
    except CheckpointWriteError as e:
        print("ERR", e)
        sys.exit(3)
    """
)


def test_b5_disk_full_keeps_the_previous_checkpoint(tmp_path):
    before = save(tmp_path, 1)
    snapshot = {p.name: p.read_bytes() for p in before.iterdir()}
    code = CHILD.format(tests=str(Path(__file__).parent), run_dir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "file too large" in proc.stdout and "previous checkpoint is intact" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001"]
    assert {p.name: p.read_bytes() for p in before.iterdir()} == snapshot
    assert [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert CheckpointWriteError.__mro__[1] is CheckpointError
