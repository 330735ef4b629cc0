"""A structure-aware file fuzzer (issue 16 item 5): the suite's seed corpus (tests/test_fuzz.py)
and the full run (bench/fuzz.py) both go through `fuzz`.

    seeds = make_seeds(tmp / "seeds")
    counts, failures = fuzz(["gguf", "state"], n=30, seed=0, seeds=seeds, work=tmp / "work")

Each case is a mutated file (fuzz/mutate.py) put in a copy of its valid seed folder and read by
the format's target (fuzz/formats.py) in a worker process limited to 1 GiB more address space than
it had at start (RLIMIT_AS) and 5 s of CPU time per case (60 s of wall time). A case ends in one of
  error     a PellucidError of one line: what every hostile file must get;
  accepted  the file still reads (a flip inside tensor data, a harmless field): fine too;
and the bugs: other (any other exception), multiline (a PellucidError of several lines), memory
(MemoryError: the file asked for more than the limit), crash (the worker died), hang (past
a limit).
The worker is forked from a forkserver that has imported torch and pellucid, and is restarted
only after a crash or a hang, so a case costs its own work, not a process start.
"""

import logging
import os
import random
import resource
import shutil
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import preloaded

from fuzz.formats import FORMATS, make_seeds
from pellucid.errors import PellucidError

__all__ = ["FORMATS", "Failure", "fuzz", "make_seeds"]
FINE = ("error", "accepted")
TIME_LIMIT_S = 5.0  # CPU seconds: wall time on a machine shared with other jobs would flake
WALL_LIMIT_S = 60.0  # a case blocked on something other than the CPU (a read that never ends)
MEMORY_LIMIT = 1 << 30


@dataclass
class Failure:
    """A case that did not end in one line: enough to replay it (`data` is the file)."""

    format: str
    case: int
    mutation: str
    outcome: str
    message: str
    data: bytes

    def __str__(self) -> str:
        return f"{self.format} #{self.case} ({self.mutation}): {self.outcome}: {self.message}"


def run_case(name: str, data: bytes, seeds: Path, work: Path) -> tuple[str, str]:
    """Read one mutated file through its format's target; (outcome, message)."""
    fmt = FORMATS[name]
    folder = work / "case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(seeds / fmt.folder, folder)
    (folder / fmt.file).write_bytes(data)
    try:
        fmt.target(folder)
    except PellucidError as e:
        text = str(e)
        return ("error" if text.strip() and "\n" not in text else "multiline"), text
    except MemoryError as e:
        return "memory", f"MemoryError {e}"[:300]
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        return "other", f"{type(e).__name__}: {str(e)[:200]} (at {where})"
    return "accepted", ""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker(conn: object, seeds: str, work: str) -> None:
    import torch

    torch.set_num_threads(1)
    logging.disable(logging.CRITICAL)  # "skipping checkpoint" warnings: the outcome says it
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + MEMORY_LIMIT
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")
    while (case := conn.recv()) is not None:
        conn.send(run_case(*case, Path(seeds), Path(work)))


class Worker:
    """One worker process at a time, replaced after a crash or a hang."""

    def __init__(self, seeds: Path, work: Path) -> None:
        self.ctx = preloaded.context(["fuzz"])
        self.args, self.proc = (str(seeds), str(work)), None

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.proc.start()
        child.close()
        assert self.conn.recv() == "ready"  # start-up (under load: seconds) is no case's time

    def _stop(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.proc = None

    def run(self, name: str, data: bytes) -> tuple[str, str, float]:
        if self.proc is None:
            self._start()
        t0, cpu0 = time.perf_counter(), _cpu_seconds(self.proc.pid)
        try:
            self.conn.send((name, data))
            while not self.conn.poll(0.05):
                cpu = _cpu_seconds(self.proc.pid) - cpu0
                if cpu > TIME_LIMIT_S or time.perf_counter() - t0 > WALL_LIMIT_S:
                    self._stop()
                    return "hang", f"no answer after {cpu:.1f} s of CPU", cpu
            outcome, message = self.conn.recv()
        except (EOFError, OSError):  # the worker died before or while answering
            self.proc.join()
            code = self.proc.exitcode
            self.proc = None
            return "crash", f"the worker died (exit {code})", time.perf_counter() - t0
        return outcome, message, _cpu_seconds(self.proc.pid) - cpu0

    def close(self) -> None:
        if self.proc is not None:
            self.conn.send(None)
            self.proc.join(10)
            self.proc = None


def fuzz(
    names: list[str], n: int, seed: int, seeds: Path, work: Path
) -> tuple[dict[str, Counter], list[Failure]]:
    """`n` mutated files of each format in `names`; counts of outcomes per format (with the
    slowest case's seconds under "max_s") and the cases that failed."""
    work.mkdir(parents=True, exist_ok=True)
    worker = Worker(seeds, work)
    counts: dict[str, Counter] = {}
    failures: list[Failure] = []
    try:
        for name in names:
            fmt = FORMATS[name]
            rng = random.Random(f"{seed}:{name}")
            valid = (seeds / fmt.folder / fmt.file).read_bytes()
            counts[name] = c = Counter()
            for i in range(n):
                data, what = fmt.mutate(rng, valid)
                outcome, message, seconds = worker.run(name, data)
                c[outcome] += 1
                c["max_s"] = max(c["max_s"], round(seconds, 2))
                if outcome not in FINE:
                    failures.append(Failure(name, i, what, outcome, message, data))
    finally:
        worker.close()
    return counts, failures
