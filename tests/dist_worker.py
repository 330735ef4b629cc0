"""One training run of the tiny model, for tests/test_distributed.py to start under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py \
        RUN_DIR PARALLEL [--resume] [--max-steps N] [--kill-rank R --kill-at-step S] [--watch-save]
        [--full-disk-rank R [--full-disk-at shard|commit]]

The same data and config whatever the world size: the global batch is `BATCH` rows.
--watch-save writes RUN_DIR/save-watch-RANK.json: how many DTensors were gathered (full_tensor,
redistribute) while saving checkpoints, and the most values any one written piece held.
"""

import argparse
import errno
import json
import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import test_trainer as tt

import pellucid.train.trainer as tr
from pellucid.train import distributed
from pellucid.train.distributed import end_process, finish_distributed
from pellucid.weights import checkpoint, sharded

BATCH = 8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("parallel")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-at-step", type=int, default=-1)
    p.add_argument("--exit-quietly", action="store_true", help="exit(0) instead of SIGKILL")
    p.add_argument("--watch-save", action="store_true")
    p.add_argument("--full-disk-rank", type=int, default=-1, help="this rank's writes fail")
    p.add_argument("--full-disk-at", choices=["shard", "commit"], default="shard")
    a = p.parse_args()
    if int(os.environ.get("RANK", 0)) == a.full_disk_rank:

        def full_disk(*args, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        if a.full_disk_at == "shard":
            sharded.write_shard = full_disk
        else:  # rank 0 writing the index, state.json and the manifest
            checkpoint.atomic_write = full_disk
    seen = watch_saving() if a.watch_save else None
    if int(os.environ.get("RANK", 0)) == a.kill_rank:
        real = tr._one_step

        def one_step_or_die(*args, **kw):
            state = args[6]
            if state.step == a.kill_at_step:
                if a.exit_quietly:  # the agent sees a success: the survivors must notice alone
                    os._exit(0)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)

        tr._one_step = one_step_or_die
    tt.run(
        a.run_dir, resume=a.resume, model=tt.tiny_model(dropout=0.0), batch_size=BATCH,
        grad_accum=a.grad_accum, max_steps=a.max_steps, checkpoint_every=4, keep_checkpoints=4,
        parallel=a.parallel, dist_timeout_s=30,
    )  # fmt: skip
    if seen is not None:
        Path(a.run_dir, f"save-watch-{os.environ.get('RANK', 0)}.json").write_text(json.dumps(seen))
    finish_distributed()


def watch_saving() -> dict:
    """Count DTensor gathers during checkpoint saves, and the largest piece written."""
    from torch.distributed.tensor import DTensor

    seen, saving = {"gathered": 0, "saves": 0, "largest": 0}, [False]

    def counted(real):
        def wrapper(self, *args, **kw):
            seen["gathered"] += saving[0]
            return real(self, *args, **kw)

        return wrapper

    DTensor.full_tensor = counted(DTensor.full_tensor)
    DTensor.redistribute = counted(DTensor.redistribute)
    real_save, real_write = distributed.save_checkpoint_ranks, sharded.write_shard

    def save(*args, **kw):
        saving[0], seen["saves"] = True, seen["saves"] + 1
        try:
            return real_save(*args, **kw)
        finally:
            saving[0] = False

    def write(folder, rank, world, pieces):
        seen["largest"] = max([seen["largest"], *(t.numel() for t in pieces.values())])
        return real_write(folder, rank, world, pieces)

    distributed.save_checkpoint_ranks, sharded.write_shard = save, write
    return seen


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # as an uncaught exception would, then end like pellucid's CLI does
        traceback.print_exc()
        end_process(1)
    end_process(0)
