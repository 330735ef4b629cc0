"""Atomic writes and the verified PyPI fetcher."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pellucid import files
from pellucid.errors import DataError


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "f.txt"
    files.atomic_write(p, "one")
    files.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(p.parent) == ["f.txt"]


def test_atomic_open_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "f.bin"
    files.atomic_write(p, b"old")
    with pytest.raises(RuntimeError), files.atomic_open(p) as f:
        f.write(b"new, half written")
        raise RuntimeError("crash mid-write")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_kill_during_write_leaves_old_file(tmp_path):
    p = tmp_path / "f.bin"
    files.atomic_write(p, b"old")
    code = textwrap.dedent(f"""
        import os, signal
        from pellucid.files import atomic_open
        with atomic_open({str(p)!r}) as f:
            f.write(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -signal.SIGKILL
    assert p.read_bytes() == b"old"


def _fake_download(payload: bytes):
    def download(art, dest):
        (dest / art.filename).write_bytes(payload)

    return download


def test_fetch_verifies_sha256_and_caches(tmp_path):
    import hashlib

    payload = b"corpus bytes"
    art = files.PyPIArtifact(
        "pkg", "1.0", "pkg-1.0.tar.gz", hashlib.sha256(payload).hexdigest(), sdist=True
    )
    path = files.fetch_pypi(art, download=_fake_download(payload))
    assert path.read_bytes() == payload
    assert path.parent == files.pellucid_home() / "downloads"

    def no_network(art, dest):
        raise AssertionError("must use the cache")

    assert files.fetch_pypi(art, download=no_network) == path


def test_fetch_rejects_a_wrong_checksum():
    art = files.PyPIArtifact("pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64)
    with pytest.raises(DataError, match=r"checksum mismatch for pkg-1\.0\.tar\.gz"):
        files.fetch_pypi(art, download=_fake_download(b"tampered"))
    assert not (files.pellucid_home() / "downloads" / "pkg-1.0.tar.gz").exists()


def test_offline_gives_one_clear_line(monkeypatch, tmp_path):
    # An index that does not exist stands in for "offline": pip fails fast and we explain what to do.
    monkeypatch.setenv("PIP_INDEX_URL", f"file://{tmp_path}/no-index")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    art = files.PyPIArtifact("surely-not-a-package-xyz", "9.9", "x.tar.gz", "0" * 64, sdist=True)
    with pytest.raises(DataError) as e:
        files.fetch_pypi(art)
    msg = str(e.value)
    assert "could not download surely-not-a-package-xyz==9.9" in msg and "offline" in msg
    assert "\n" not in msg


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "x.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": {"b": [1, 2]}}, None),
        ({"a": {"b": [1, "2"]}}, "field 'a.b[1]' must be an integer, got a string"),
        ({"a": {"b": [True]}}, "field 'a.b[0]' must be an integer, got true or false"),
        ({"a": {}}, "field 'a.b' is missing"),
        ({"a": []}, "field 'a' must be an object, got a list"),
        ({"a": {"b": [], "c": None}}, None),  # "c?" may be null
        ({"a": {"b": [], "c": 3}}, "field 'a.c' must be a string, got an integer"),
        ([], "the top level must be an object, got a list"),
    ],
)
def test_check_shape_names_the_field(value, message):
    from pellucid.errors import DataError
    from pellucid.files import check_shape

    shape = {"a": {"b": [int], "c?": str}}
    if message is None:
        check_shape(value, shape, "x.json")
    else:
        with pytest.raises(DataError) as err:
            check_shape(value, shape, "x.json")
        assert str(err.value) == f"x.json: {message}"


def test_read_json_refuses_what_is_not_a_small_regular_json_file(tmp_path):
    import os

    from pellucid.errors import DataError
    from pellucid.files import read_json

    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "ok.json", shape={"a": int}) == {"a": 1}
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "big.json").write_text("[" + "0," * 100 + "0]")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    cases = {
        "missing.json": "not found",
        "fifo.json": "not a regular file",
        ".": "not a regular file",
        "big.json": "too large",
        "deep.json": "nested too deeply",
    }
    for name, words in cases.items():
        with pytest.raises(DataError, match=words):
            read_json(tmp_path / name, max_bytes=100 if name == "big.json" else 1 << 20)


@pytest.mark.parametrize(
    ("make", "kind", "words"),
    [
        (lambda p: p.write_text("x"), "dir", "is a file; give a folder"),
        (lambda p: p.mkdir(), "file", "is a folder; give a file name"),
        (lambda p: None, "file", None),
        (lambda p: None, "dir", None),
    ],
)
def test_check_output_before_work(tmp_path, make, kind, words):
    from pellucid.errors import FileWriteError

    target = tmp_path / "out"
    make(target)
    if words is None:
        assert files.check_output(target / "new" / "deeper", kind) == target / "new" / "deeper"
        return
    with pytest.raises(FileWriteError, match=words):
        files.check_output(target, kind)


def test_check_output_under_a_file_or_unwritable(tmp_path):
    from pellucid.errors import FileWriteError

    (tmp_path / "f").write_text("x")
    with pytest.raises(FileWriteError, match="is a file, so nothing can be made under it"):
        files.check_output(tmp_path / "f" / "sub" / "x.html")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root may write anywhere
        with pytest.raises(FileWriteError, match=r"cannot write in .*Permission denied"):
            files.check_output(locked / "x.gguf")
    if Path("/proc/self").is_dir():  # writable by its mode bits for root, yet nothing can be made
        with pytest.raises(FileWriteError, match="cannot write in /proc"):
            files.check_output(Path("/proc/pellucid-run"), "dir")


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    from pellucid import files
    from pellucid.errors import PellucidError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    try:
        files.atomic_write({path!r}, b"new" * 10_000)
    except PellucidError as e:
        print(e)
        sys.exit(3)
    """
)


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "tokenizer.json"
    target.write_bytes(b"old")
    code = DISK_FULL.format(path=str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and str(target) in line and "the previous file is intact" in line
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left


def test_cli_output_paths_are_checked_before_any_work(tmp_path, capsys):
    from pellucid.cli import main

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    cases = [
        ["tokenizer", "train", "--corpus", "nowhere", "--vocab-size", "300", "--out", str(a_file)],
        ["export", "--model", "nowhere", "--format", "hf", "--out", str(a_file)],
        ["export", "--model", "nowhere", "--format", "gguf", "--out", str(tmp_path)],
        ["explain", "--model", "nowhere", "x", "--html", str(tmp_path)],
        ["explain", "--model", "nowhere", "x", "--png", str(a_file)],
        ["train", "--out", str(a_file / "run")],
    ]
    for argv in cases:  # "nowhere" would fail later: the path is refused first
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and ("is a file" in err or "is a folder" in err), err
