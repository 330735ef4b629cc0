"""`python -m pellucid` is the `pellucid` console script."""

import os

from pellucid.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker: no interpreter teardown
    from pellucid.train.distributed import end_process

    end_process(code)
raise SystemExit(code)
