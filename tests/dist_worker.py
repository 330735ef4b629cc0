"""One training run of the tiny model, for tests/test_distributed.py to start under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py \
        RUN_DIR PARALLEL [--resume] [--max-steps N] [--kill-rank R --kill-at-step S]

The same data and config whatever the world size: the global batch is `BATCH` rows.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import test_trainer as tt

import pellucid.train.trainer as tr
from pellucid.train.distributed import finish_distributed

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
    a = p.parse_args()
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
    finish_distributed()


if __name__ == "__main__":
    main()
