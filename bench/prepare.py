"""Preparation throughput: `data prepare` of the shakespeare corpus with 1 and 2 workers.

    python bench/prepare.py [--tokenizer PATH] [--corpus SPEC]

Prints MB of UTF-8 text per second per worker (the manifest's `mb_per_s_per_worker`) and the
speed-up of 2 workers over 1. The tokenizer defaults to the 2048-token BPE `pellucid demo` trains.
"""

import argparse
import glob
import os
import tempfile
from pathlib import Path

from pellucid.data.prepare import prepare
from pellucid.files import pellucid_home


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--corpus", default=str(pellucid_home() / "corpora" / "shakespeare"))
    p.add_argument("--workers", default="1,2")
    a = p.parse_args()
    tok = a.tokenizer or sorted(glob.glob(str(pellucid_home() / "tokenizers/*/tokenizer.json")))[0]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in map(int, a.workers.split(",")):
            m = prepare([a.corpus], Path(tmp) / f"w{w}", tok, workers=w, shard_tokens=1 << 20)
            rates[w] = m["mb_per_s_per_worker"]
            print(
                f"workers={w}: {m['text_bytes'] / 1e6:.2f} MB, {m['train_tokens']:,} tokens, "
                f"{m['seconds']:.1f} s, {m['mb_per_s_per_worker']:.3f} MB/s per worker, "
                f"{m['mb_per_s_per_worker'] * w:.3f} MB/s in all"
            )
    if 1 in rates and 2 in rates:
        print(
            f"2 workers / 1 worker, total throughput: {2 * rates[2] / rates[1]:.2f}x "
            f"(cpus: {os.cpu_count()})"
        )


if __name__ == "__main__":
    main()
