"""The suite's forkserver: child processes forked from a server that has imported their code.

The fuzzer's worker (tests/fuzz) and the kill loop's runs (tests/kill_helpers.py) start from
multiprocessing's forkserver so a child costs its own work, not Python's, torch's and the test
modules' imports. There is one forkserver per process, and it imports its preload list once, when
it starts: `context(modules)` makes sure the running one has imported `modules`, restarting it
if it was started for other ones (the fuzzer's, then the kill loop's, in one pytest session).

Python 3.11's forkserver ignores the parent's sys.path (its imports see the working directory's),
and a preload that fails to import is skipped without a word: run from the repository root, as
CI runs, every child then imported everything itself (~6 s a kill trial instead of ~1). So the
tests folder goes on the server's PYTHONPATH.
"""

import multiprocessing
import multiprocessing.forkserver
import os
from multiprocessing.context import BaseContext
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)


def context(modules: list[str]) -> BaseContext:
    """The forkserver context, its server running with `modules` imported."""
    ctx = multiprocessing.get_context("forkserver")
    # The one server per process; restarting it has no public API (CPython 3.8-3.13 have these).
    server = multiprocessing.forkserver._forkserver
    running = getattr(server, "_forkserver_pid", None) is not None
    if running and getattr(server, "_preload_modules", modules) != modules:
        server._stop()  # children forked from it keep running; new ones come from the new server
    ctx.set_forkserver_preload(modules)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, old) if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return ctx
