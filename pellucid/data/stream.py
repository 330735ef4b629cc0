"""Prepared datasets (data/prepare.py) read back from disk with bounded memory, and mixed by weight.

`TokenFiles` makes a prepared dataset's shard files look like one 1-D token array to the window
sampler (data/batches.py), which then draws from it exactly as from an in-memory shard: the same
sampler, the same `state()` = (seed, step), so a resumed run continues at the exact batch. Reads
are positional (`os.pread`) of just the windows a batch needs: nothing is memory-mapped, so a
corpus far larger than RAM trains in the memory of one batch (the page cache is the kernel's, not
ours, and it gives the pages back under pressure).

    data.mix=DIR                    one prepared dataset
    data.mix=books:0.7,code:0.3     rows drawn from `books` with probability 0.7 (names are
                                    folders, or prepared datasets under $PELLUCID_HOME/prepared/)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pellucid.data.shards import Shards
from pellucid.errors import ConfigError, DataError
from pellucid.files import pellucid_home, read_json, sha256_file

FORMAT = "pellucid-prepared/1"
# The fields of manifest.json the readers use, with their types (pellucid.files.check_shape).
_FILE = {"file": str, "tokens": int, "sha256": str}
MANIFEST_SHAPE = {
    "format": str, "dtype": str, "tokenizer_sha256": str, "shards": [_FILE], "val": _FILE,
    "train_tokens": int, "train_bytes": int, "val_tokens": int, "val_bytes": int,
}  # fmt: skip


class TokenFiles:
    """Shard files laid end to end, indexable like the (N,) token array they hold.

    Supports `len()` and indexing with a (B, W) array of consecutive positions per row (what
    WindowSampler asks for), or an int, or a slice; returns int64-convertible numpy arrays.
    """

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.paths, self.counts, self.dtype = paths, counts, np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S + 1,)
        self._fds: dict[int, int] = {}
        self.max_bytes_held = 0  # the largest read so far: what "bounded memory" means here

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self.read(start, max(0, stop - start))[::step]
        idx = np.asarray(index)
        if idx.ndim == 0:
            return self.read(int(idx), 1)[0]
        if idx.ndim != 2:
            raise TypeError("TokenFiles takes an int, a slice or (B, W) windows of positions")
        rows = [self.read(int(r[0]), idx.shape[1]) for r in idx]
        out = np.stack(rows) if rows else np.zeros(idx.shape, self.dtype)
        self.max_bytes_held = max(self.max_bytes_held, out.nbytes)
        return out

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens start .. start + count - 1, across shard boundaries, as a (count,) array."""
        if start < 0 or start + count > len(self):
            raise IndexError(f"tokens {start}..{start + count} outside 0..{len(self)}")
        parts = []
        while count > 0:
            s = (
                int(np.searchsorted(self.starts, start, side="right")) - 1
            )  # the shard holding start
            offset = start - int(self.starts[s])
            n = min(count, self.counts[s] - offset)
            size = self.dtype.itemsize
            data = os.pread(self._fd(s), n * size, offset * size)
            if len(data) != n * size:
                raise DataError(f"{self.paths[s]}: shorter than its manifest says (truncated?)")
            parts.append(np.frombuffer(data, dtype=self.dtype))
            start, count = start + n, count - n
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


@dataclass
class Prepared:
    """An opened prepared dataset: its train tokens (streamed), val tokens and manifest."""

    folder: Path
    train: TokenFiles
    val: np.ndarray  # (N_val,) the val tokens, read whole (they are few)
    manifest: dict[str, Any]


def resolve_prepared(spec: str) -> Path:
    """A prepared dataset folder, or the name of one under $PELLUCID_HOME/prepared/."""
    path = Path(spec).expanduser()
    if not path.exists() and "/" not in spec:
        path = pellucid_home() / "prepared" / spec
    if not (path / "manifest.json").is_file():
        raise DataError(
            f"{spec}: not a prepared dataset (no manifest.json; make one with `pellucid data prepare`)"
        )
    return path


def open_prepared(spec: str, *, check: bool = False) -> Prepared:
    """Open a prepared dataset; sizes are always checked, sha256 of every file with `check`."""
    folder = resolve_prepared(spec)
    manifest = read_json(folder / "manifest.json", DataError, shape=MANIFEST_SHAPE)
    if manifest["format"] != FORMAT or manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{folder}/manifest.json: not a {FORMAT} manifest")
    dtype = np.dtype(manifest["dtype"])
    files = [*manifest["shards"], manifest["val"]]
    for entry in files:
        path = folder / Path(entry["file"]).name
        size = path.stat().st_size if path.is_file() else -1
        if size != entry["tokens"] * dtype.itemsize:
            raise DataError(f"{path}: {size} bytes, its manifest says {entry['tokens']} tokens")
        if check and sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path}: fails its sha256 check")
    shards = manifest["shards"]
    if not shards:
        raise DataError(f"{folder}: holds no training tokens")
    train = TokenFiles([folder / s["file"] for s in shards], [s["tokens"] for s in shards], dtype)
    val = np.fromfile(folder / "val.bin", dtype=dtype)
    return Prepared(folder, train, val, manifest)


def parse_mix(text: str) -> list[tuple[str, float]]:
    """'a:0.7,b:0.3' -> [('a', 0.7), ('b', 0.3)]; a single 'a' weighs 1. Weights are normalised
    by the sampler, so 'a:7,b:3' means the same."""
    out = []
    for item in (p.strip() for p in text.split(",")):
        name, sep, weight = item.rpartition(":")
        if not sep:
            name, weight = item, "1"
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not name or not w > 0:
            raise ConfigError(
                f"config key 'data.mix': bad entry {item!r}; expected NAME:WEIGHT with a weight > 0"
            )
        out.append((name, w))
    return out


def open_mix(text: str) -> tuple[list[Prepared], list[float]]:
    """The datasets of a `data.mix` value and their weights; all must share one tokenizer."""
    entries = parse_mix(text)
    datasets = [open_prepared(name) for name, _ in entries]
    shas = {d.manifest["tokenizer_sha256"] for d in datasets}
    if len(shas) > 1:
        names = ", ".join(name for name, _ in entries)
        raise ConfigError(f"config key 'data.mix': {names} were prepared with different tokenizers")
    return datasets, [w for _, w in entries]


def as_shards(datasets: list[Prepared], mix: str) -> Shards:
    """The mix seen as `Shards` for evaluation and the run report: val = the first dataset that
    has val tokens; `train` is the first dataset's (the sampler gets all of them)."""
    with_val = [d for d in datasets if len(d.val)] or datasets[:1]
    first = with_val[0]
    meta = {
        "train_tokens": sum(d.manifest["train_tokens"] for d in datasets),
        "train_bytes": sum(d.manifest["train_bytes"] for d in datasets),
        "val_tokens": first.manifest["val_tokens"],
        "val_bytes": first.manifest["val_bytes"],
        "tokenizer_sha256": first.manifest["tokenizer_sha256"],
        "key": f"mix {mix}",
    }
    return Shards(folder=first.folder, train=datasets[0].train, val=first.val, meta=meta)
