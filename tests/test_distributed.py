"""Scale-out: torchrun with 2 CPU ranks (gloo) trains the tiny model like one process does.

Tolerances: DDP and FSDP2 sum the gradient over the ranks in another order than one process
sums it over the rows of its batch, so the weights after 8 AdamW steps agree to fp32 rounding
(measured ~2e-6 absolute at lr 3e-3; asserted < 2e-5), not bit for bit. Moving a checkpoint
between world sizes is exact (the same fp32 values, whole or in shards); a resumed run then
follows the world size it resumed in. The same world size resumed after a kill -9 is bit-exact.
FSDP2 checkpoints are sharded (weights/sharded.py): every rank writes its own pieces.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_trainer as tt
import torch

from pellucid.data.batches import Batch, WindowSampler
from pellucid.errors import CheckpointError, ConfigError
from pellucid.train import distributed as dist
from pellucid.train.distributed import World
from pellucid.weights import sharded
from pellucid.weights.checkpoint import latest_good

WORKER = Path(__file__).parent / "dist_worker.py"
PKG = Path(__file__).resolve().parents[1] / "pellucid"
TOL = 2e-5


# --- in one process -------------------------------------------------------------------------------


def test_the_model_files_hold_no_distributed_calls():
    """Parallelism wraps the model from outside (STYLE.md 3.9)."""
    offenders = [
        p.name
        for p in (PKG / "model").rglob("*.py")
        if "torch.distributed" in p.read_text() or "import distributed" in p.read_text()
    ]
    assert offenders == []
    assert "fully_shard" in (PKG / "train" / "distributed.py").read_text()  # the scan's target


def test_parallel_resolves_by_world_size():
    one, two = World(), World(rank=0, size=2)
    assert [dist.resolve_parallel(h, one) for h in ("auto", "none", "ddp", "fsdp")] == ["none"] * 4
    assert dist.resolve_parallel("auto", two) == "ddp"
    assert dist.resolve_parallel("fsdp", two) == "fsdp"
    with pytest.raises(ConfigError, match="unsynchronised"):
        dist.resolve_parallel("none", two)


def test_a_global_batch_that_does_not_split_is_one_clear_error():
    with pytest.raises(ConfigError) as e:
        dist.check_divides(6, World(rank=1, size=4))
    assert "train.batch_size=6" in str(e.value) and "\n" not in str(e.value)
    dist.check_divides(8, World(rank=1, size=4))


def test_ranks_read_disjoint_slices_that_make_up_the_global_batch():
    tokens = tt.synthetic_tokens()
    whole = next(WindowSampler(tokens, 8, 16, seed=3))
    parts = []
    for rank in range(4):
        s = WindowSampler(tokens, 8, 16, seed=3)
        batches = dist.local_batches(s, World(rank=rank, size=4))
        parts.append(next(batches))
        assert batches.state() == {"seed": 3, "step": 1}  # the position is the global one
    assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
    assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)


def test_any_batch_iterator_is_sliced_and_keeps_its_state():
    class Counting:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            return Batch(torch.arange(12).view(6, 2), torch.arange(12).view(6, 2))

        def state(self):
            return {"n": self.n}

    sliced = dist.local_batches(Counting(), World(rank=2, size=3))
    b = next(sliced)
    assert b.inputs.tolist() == [[8, 9], [10, 11]]
    assert sliced.state() == {"n": 1}


# --- the sharded layout, written and read in one process -----------------------------------------


def write_pieces(folder, full, rows, dim=0):
    """Store `full` as pieces of `rows` slices along `dim`, one shard file per piece (as FSDP2's
    ranks would); returns the index's boxes."""
    boxes, start = [], 0
    for rank, n in enumerate(rows):
        offset = [0] * full.dim()
        offset[dim] = start
        piece = full.narrow(dim, start, n).contiguous()
        sharded.write_shard(folder, rank, len(rows), {"model.w": piece})
        boxes.append({"model.w": [offset, list(piece.shape)]})
        start += n
    meta = {"model.w": (list(full.shape), "F32")}
    (folder / sharded.INDEX).write_text(sharded.index_json(len(rows), meta, boxes, {}))
    return boxes


def test_a_reader_serves_any_box_from_only_the_pieces_that_overlap_it(tmp_path):
    full = torch.arange(7 * 5, dtype=torch.float32).view(7, 5)
    write_pieces(tmp_path, full, [4, 3])  # 2 ranks: rows 0-3 and 4-6
    reader = sharded.ShardReader(tmp_path)
    assert torch.equal(reader.read("model.w"), full)  # one process: the whole tensor
    for start, n in [(0, 3), (3, 3), (6, 1)]:  # 3 ranks: each reads its rows alone
        assert torch.equal(reader.read("model.w", (start, 0), (n, 5)), full[start : start + n])
    assert torch.equal(reader.read("model.w", (2, 1), (4, 3)), full[2:6, 1:4])
    (tmp_path / "shard-1-of-2.safetensors").unlink()  # rows 0-3 never touch the second file
    reader = sharded.ShardReader(tmp_path)
    assert torch.equal(reader.read("model.w", (0, 0), (4, 5)), full[:4])
    with pytest.raises(CheckpointError, match="shard-1-of-2"):
        reader.read("model.w")


def test_pieces_split_along_another_dim_read_as_rows(tmp_path):
    full = torch.randn(6, 8)
    write_pieces(tmp_path, full, [3, 3, 2], dim=1)
    reader = sharded.ShardReader(tmp_path)
    assert torch.equal(reader.read("model.w", (3, 0), (3, 8)), full[3:])


def test_a_bad_index_is_one_clear_checkpoint_error(tmp_path):
    full = torch.zeros(4, 2)
    boxes = write_pieces(tmp_path, full, [2, 2])
    meta = {"model.w": ([4, 2], "F32")}
    index = tmp_path / sharded.INDEX
    index.write_text(sharded.index_json(2, meta, boxes[:1], {}))  # a piece left out
    with pytest.raises(CheckpointError, match="cover 4 of 8 values"):
        sharded.ShardReader(tmp_path).read("model.w")
    bad = json.loads(sharded.index_json(2, meta, boxes, {}))
    bad["tensors"]["model.w"]["pieces"][0]["file"] = "../model.safetensors"
    index.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="bad dtype, file name or box"):
        sharded.ShardReader(tmp_path)
    bad["tensors"]["model.w"]["pieces"] = "all of them"
    index.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="pieces' must be a list"):
        sharded.ShardReader(tmp_path)
    boxes[0]["model.w"][1] = [3, 2]  # the index says 3 rows where the file holds 2
    index.write_text(sharded.index_json(2, meta, boxes, {}))
    with pytest.raises(CheckpointError, match=r"no model\.w of shape"):  # the file disagrees
        sharded.ShardReader(tmp_path).read("model.w")


def test_sharded_pieces_count_only_once_rank_0_commits_the_manifest_last(tmp_path):
    from pellucid.weights.checkpoint import begin_checkpoint, commit_checkpoint, verify

    tmp = begin_checkpoint(tmp_path, 3, "ranks")
    files = {
        sharded.shard_file(r, 2): sharded.write_shard(tmp, r, 2, {"model.w": torch.ones(2, 3) * r})
        for r in range(2)
    }
    assert latest_good(tmp_path) is None  # the shards alone, in the staging folder: no checkpoint
    meta = {"model.w": ([4, 3], "F32")}
    boxes = [{"model.w": [[2 * r, 0], [2, 3]]} for r in range(2)]
    payload = {sharded.INDEX: sharded.index_json(2, meta, boxes, {}), "state.json": "{}"}
    final = commit_checkpoint(tmp, 3, payload, files)
    assert not tmp.exists() and latest_good(tmp_path) == final
    assert set(verify(final)["files"]) == {*files, sharded.INDEX, "state.json"}
    assert torch.equal(sharded.ShardReader(final).read("model.w")[2:], torch.ones(2, 3))
    (final / sharded.shard_file(1, 2)).write_bytes(b"x")  # a shard the manifest does not match
    assert latest_good(tmp_path) is None


# --- under torchrun (2 CPU processes, gloo) -------------------------------------------------------


def worker_env(run_dir):
    """The environment of a torchrun job: tests/teardown_probe first on the path, so that a rank
    whose interpreter starts its teardown with gloo's threads still running leaves a
    `teardown-race-RANK` file in `run_dir` (the race behind a SIGABRT after a good run)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = f"{Path(__file__).parent / 'teardown_probe'}{os.pathsep}{PKG.parent}"
    return {
        **os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONFAULTHANDLER": "1",
        "PELLUCID_TEARDOWN_DIR": str(run_dir),
    }  # fmt: skip


def no_teardown_race(run_dir):
    races = {p.name: p.read_text() for p in Path(run_dir).glob("teardown-race-*")}
    assert not races, f"ranks exited through the interpreter's teardown with gloo threads: {races}"


def torchrun(run_dir, parallel, *extra, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(WORKER), str(run_dir), parallel, *extra]
    env = worker_env(run_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    no_teardown_race(run_dir)
    return proc


def one_process(run_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PKG.parent)}
    cmd = [sys.executable, str(WORKER), str(run_dir), "none", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(run_dir, step=8, name="model"):
    """Whole tensors of a checkpoint's `name` ("model" or "optim"), from either layout."""
    folder = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    return sharded.ShardReader(folder).read_section(name)


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 8 steps (global batch 8 rows x 2 micro-batches) in 1 process, with DDP, with FSDP."""
    root = tmp_path_factory.mktemp("dist")
    one_process(root / "one")
    for how in ("ddp", "fsdp"):
        proc = torchrun(root / how, how, "--watch-save")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_two_ranks_train_the_weights_one_process_trains(runs, how):
    assert max_diff(weights(runs / "one"), weights(runs / how)) < TOL
    assert max_diff(weights(runs / "one", name="optim"), weights(runs / how, name="optim")) < TOL
    one, two = tt.losses(runs / "one"), tt.losses(runs / how)
    assert len(one) == len(two) == 8
    np.testing.assert_allclose(two, one, rtol=1e-6)
    # rank 0 alone wrote the metrics: one line per step, not two
    assert len((runs / how / "metrics.jsonl").read_text().splitlines()) == 8


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_a_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path, how):
    run = tmp_path / "resumed"
    shutil.copytree(runs / how, run)
    shutil.rmtree(run / "checkpoints" / "step_000008")
    one_process(run, "--resume")
    # the same trajectory as the 2-rank run it came from, and as 1 process from the start
    assert max_diff(weights(run), weights(runs / how)) < TOL
    assert max_diff(weights(run), weights(runs / "one")) < TOL
    # one process writes the one-file layout again
    assert (run / "checkpoints" / "step_000008" / "model.safetensors").is_file()
    # and one process loads a 2-rank checkpoint of either layout whole
    from pellucid.weights.checkpoint import load_model_weights

    model = tt.tiny_model(dropout=0.0)
    load_model_weights(runs / how / "checkpoints" / "step_000008", model)
    assert torch.equal(model.tok_emb.weight, weights(runs / how)["tok_emb.weight"])
    assert model.lm_head.weight is model.tok_emb.weight  # still tied


@pytest.mark.slow
def test_moving_a_sharded_checkpoint_to_one_process_is_bit_exact(runs, tmp_path):
    """2 -> 1 changes no bit: one process loads the shards of step 4 (weights and AdamW state)
    and writes them again as one file each; every tensor is equal, not merely close."""
    from pellucid.train.optim import build_optimizer
    from pellucid.weights.checkpoint import load_checkpoint, save_checkpoint

    model = tt.tiny_model(dropout=0.0)
    optimizer = build_optimizer(model, tt.cfg())
    saved = load_checkpoint(runs / "fsdp" / "checkpoints" / "step_000004", model, optimizer)
    save_checkpoint(tmp_path, 4, model, optimizer, {"train_state": saved["train_state"]})
    for name in ("model", "optim"):
        one, shards = weights(tmp_path, 4, name), weights(runs / "fsdp", 4, name)
        assert sorted(one) == sorted(shards) and len(one) > 5
        assert all(torch.equal(one[k], shards[k]) for k in one), name


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_in_two_fsdp_ranks(runs, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(runs / "one", run)
    shutil.rmtree(run / "checkpoints" / "step_000008")
    proc = torchrun(run, "fsdp", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(weights(run), weights(runs / "one")) < TOL
    assert max_diff(weights(run), weights(runs / "fsdp")) < TOL
    assert max_diff(weights(run, name="optim"), weights(runs / "fsdp", name="optim")) < TOL
    # step 4 was one file, step 8 the shards of the 2 ranks that resumed it
    assert sorted(p.name for p in (run / "checkpoints" / "step_000008").glob("shard-*")) == [
        "shard-0-of-2.safetensors",
        "shard-1-of-2.safetensors",
    ]


@pytest.mark.slow
def test_fsdp_ranks_each_write_their_shards_and_gather_nothing(runs):
    folder = runs / "fsdp" / "checkpoints" / "step_000008"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "manifest.json",
        "shard-0-of-2.safetensors",
        "shard-1-of-2.safetensors",
        "shards.json",
        "state.json",
    ]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    index = json.loads((folder / "shards.json").read_text())
    # every weight and AdamW moment is split by rows between the two ranks
    for name, entry in index["tensors"].items():
        if not name.endswith(".step"):
            rows = [p["shape"][0] for p in entry["pieces"]]
            assert len(rows) == 2 and sum(rows) == entry["shape"][0], name
            assert [p["offset"][0] for p in entry["pieces"]] == [0, rows[0]], name
    sizes = [(folder / f"shard-{r}-of-2.safetensors").stat().st_size for r in range(2)]
    assert max(sizes) < 0.6 * sum(sizes)  # each rank wrote about half of the state
    for rank in range(2):
        seen = json.loads((runs / "fsdp" / f"save-watch-{rank}.json").read_text())
        assert seen["saves"] == 2 and seen["gathered"] == 0  # no full_tensor()/redistribute
        # the largest thing a rank held to write it: half of the embedding, the largest tensor
        assert seen["largest"] == 256 * 64 // 2
    # nothing of the kind under DDP: rank 0 writes the one-process layout from its full copy
    assert (runs / "ddp" / "checkpoints" / "step_000008" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_damaged_shard_makes_the_previous_checkpoint_the_latest_good(runs, tmp_path, damage):
    run = tmp_path / "damaged"
    shutil.copytree(runs / "fsdp", run)
    shard = run / "checkpoints" / "step_000008" / "shard-1-of-2.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    assert latest_good(run).name == "step_000004"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_a_killed_rank_stops_the_job_and_the_resume_completes(runs, tmp_path, how):
    run = tmp_path / "killed"
    t0 = time.monotonic()
    proc = torchrun(run, how, "--kill-rank", "1", "--kill-at-step", "6")
    took = time.monotonic() - t0
    assert proc.returncode != 0
    # torchrun's agent names the dead rank and its signal (usually as the root cause; if the
    # survivor noticed first, its own one-line TrainingError is there too)
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : -9" in proc.stderr, proc.stderr[-2000:]
    assert took < 120  # bounded: the agent stops the survivor, no collective waits forever
    assert tt.latest_step(run) == 4
    proc = torchrun(run, how, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same world size and reduction order: the resumed curve is the uninterrupted one exactly
    assert tt.losses(run) == tt.losses(runs / how)
    assert max_diff(weights(run), weights(runs / how)) == 0.0
    assert max_diff(weights(run, name="optim"), weights(runs / how, name="optim")) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(("rank", "where", "says"), [
    (1, "shard", "step_000004 on rank 1: [Errno 28] No space left"),  # its own shard
    (0, "commit", "step_000004: no space left on device"),  # the index, state.json or manifest
])  # fmt: skip
def test_a_rank_that_cannot_write_stops_every_rank_at_that_save(tmp_path, rank, where, says):
    run = tmp_path / "full"
    t0 = time.monotonic()
    proc = torchrun(run, "fsdp", "--full-disk-rank", str(rank), "--full-disk-at", where,
                    "--max-steps", "4")  # fmt: skip
    assert proc.returncode != 0
    # every rank raises the same one-line error at once: none waits out a collective timeout
    lines = [x for x in proc.stderr.splitlines() if "CheckpointWriteError: cannot write" in x]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert all(says in x for x in lines), lines
    assert time.monotonic() - t0 < 60
    assert latest_good(run) is None  # nothing half-written counts as a checkpoint
    assert not list((run / "checkpoints").glob("step_*"))


def test_fsdp_config_key_survives_a_round_trip_through_config_json():
    from pellucid import config
    from pellucid.recipes import RunConfig

    run = config.override(RunConfig(), ["train.parallel=fsdp", "train.dist_timeout_s=60"])
    again = config.from_dict(RunConfig, json.loads(json.dumps(config.to_dict(run))))
    assert again.train.parallel == "fsdp" and again.train.dist_timeout_s == 60
    assert dataclasses.asdict(again.train) == dataclasses.asdict(run.train)


@pytest.mark.slow
def test_torchrun_runs_pellucid_train_with_fsdp_and_generate_loads_the_sharded_run(
    tmp_path, capsys
):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = [
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
    ]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(2000)))
    run = tmp_path / "run"
    env = worker_env(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "pellucid", "train", "model.preset=tiny", f"data.corpus={corpus}"]
    cmd += ["data.vocab_size=300", "train.max_steps=4", "train.batch_size=4", "train.device=cpu"]
    cmd += [
        "train.eval_batches=2",
        "train.warmup_steps=1",
        "train.parallel=fsdp",
        "--out",
        str(run),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_teardown_race(tmp_path)  # pellucid's CLI ends its ranks without the exit race
    assert proc.stdout.count("validation bits per byte") == 1  # rank 0 alone reports
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5  # 4 steps + 1 evaluation
    assert (run / "report.md").is_file()
    assert (run / "checkpoints" / "step_000004" / "shards.json").is_file()  # a sharded run
    from pellucid.cli import main

    assert main(["generate", "--model", str(run), "the king", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out  # a continuation came out


@pytest.mark.slow
def test_a_rank_that_vanishes_quietly_is_reported_by_the_survivor_in_one_line(tmp_path):
    """The agent sees exit code 0 for the vanished rank: the survivor's collective fails and
    the trainer turns gloo's error into one line naming the step and the last checkpoint."""
    run = tmp_path / "vanished"
    proc = torchrun(run, "ddp", "--kill-rank", "1", "--kill-at-step", "6", "--exit-quietly")
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if "TrainingError: rank 0: lost contact" in x]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "during step 7" in lines[0] and "step_000004" in lines[0]
