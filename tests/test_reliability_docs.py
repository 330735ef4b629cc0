"""docs/RELIABILITY.md and docs/SECURITY.md name the test behind each promise; every
`tests/FILE.py::NAME` they cite must exist as a test function (found with ast, not by importing
the file), so a renamed or deleted test makes this fail instead of leaving a promise unproved."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ["docs/RELIABILITY.md", "docs/SECURITY.md"]
CITED = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def defined_tests(path: Path) -> set[str]:
    """Every test function a file defines (module level or in a class)."""
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
    }


def citations(doc: str) -> list[tuple[str, str]]:
    return CITED.findall((ROOT / doc).read_text())


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_a_doc_cites_exists(doc):
    cited = citations(doc)
    assert len(cited) >= 30, f"{doc} cites only {len(cited)} tests"
    missing = [
        f"{f}::{name}"
        for f, name in cited
        if not (ROOT / f).is_file() or name not in defined_tests(ROOT / f)
    ]
    assert not missing, missing


def test_the_check_catches_a_missing_test(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "def test_here():\n    pass\n\nclass T:\n    def test_in(self): pass\n"
    )
    assert defined_tests(tmp_path / "test_x.py") == {"test_here", "test_in"}
    text = "`tests/test_x.py::test_here` and `tests/a/b.py::test_gone`"
    assert CITED.findall(text) == [("tests/test_x.py", "test_here"), ("tests/a/b.py", "test_gone")]


def test_every_reliability_bar_entry_is_in_the_docs():
    """A1-A15, B1-B12, C1-C3 in RELIABILITY.md and D1-D8 in SECURITY.md, each with a citation,
    and issue 16's items 1-9 in RELIABILITY.md's item table."""
    rel, sec = ((ROOT / d).read_text() for d in DOCS)
    for ids, text in (
        (
            [f"A{i}" for i in range(1, 16)] + [f"B{i}" for i in range(1, 13)] + ["C1", "C2", "C3"],
            rel,
        ),
        ([f"D{i}" for i in range(1, 9)], sec),
    ):
        for id_ in ids:
            row = re.search(rf"^\| {id_} \|.*$", text, re.M)
            assert row and CITED.search(row.group()), f"{id_} has no row with a cited test"
    items = set(re.findall(r"^\| (\d) \|", rel, re.M))
    assert items == {str(i) for i in range(1, 10)}, items
