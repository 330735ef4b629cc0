"""The full file-fuzzing run (issue 16 item 5): N structure-aware mutated files per format, each
read by pellucid in a worker under 1 GiB more address space and 5 s; prints the outcome counts per
format and every case that did not end in one PellucidError line (a bug), and exits 1 if any did.

    python bench/fuzz.py --n 500                    # every format, single thread
    python bench/fuzz.py --n 50 --formats gguf state --save /tmp/fuzz-failures

The fuzzer itself is tests/fuzz/ (the suite runs a seeded subset: tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz import FINE, FORMATS, fuzz, make_seeds

COLUMNS = ["error", "accepted", "other", "multiline", "memory", "crash", "hang"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="mutated files per format")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--save", type=Path, help="write each failing case's file here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = make_seeds(Path(tmp) / "seeds")
        t0 = time.perf_counter()
        total, failures = Counter(), []
        print(f"| format | cases | {' | '.join(COLUMNS)} | slowest case, CPU s |")
        print(f"|---|---:|{'---:|' * (len(COLUMNS) + 1)}")
        for name in args.formats:  # one format at a time, so its row prints as soon as it is done
            counts, failed = fuzz([name], args.n, args.seed, seeds, Path(tmp) / "work")
            c = counts[name]
            total.update({k: v for k, v in c.items() if k != "max_s"})
            failures += failed
            cells = " | ".join(str(c[k]) for k in COLUMNS)
            print(f"| {name} | {args.n} | {cells} | {c['max_s']:.2f} |", flush=True)
        cells = " | ".join(str(total[k]) for k in COLUMNS)
        print(f"| all | {args.n * len(args.formats)} | {cells} | |")
        print(f"\n{time.perf_counter() - t0:.0f} s; {len(failures)} failures")
    for f in failures:
        print(f" - {f}")
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"{f.format}-{f.case}").write_bytes(f.data)
    assert set(FINE) <= set(COLUMNS)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
