"""The shape of the package: module size caps, import layering, no pickle/exec (STYLE.md 5.6)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pellucid"
MODULE_CAP, PACKAGE_CAP = 450, 20_000

# Lower layers never import higher ones (STYLE.md 4.3).
LAYERS = {
    "errors": 0,
    "files": 0,
    "config": 0,
    "gguf_reader": 0,
    "tokenizer": 1,
    "data": 2,
    "model": 2,
    "weights": 3,
    "infer": 4,
    "train": 5,
    "explain": 5,
    "history": 5,
    "align": 5,
    "serve": 6,
    "finetune": 6,
    "rlhf": 6,
    "recipes": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": 0,
}


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def _code_lines(path: Path) -> int:
    n = 0
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        n += 1
    return n


def _area(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0].removesuffix(".py")


def test_module_and_package_size_caps():
    sizes = {p: _code_lines(p) for p in _modules()}
    too_big = {str(p.relative_to(PKG)): n for p, n in sizes.items() if n > MODULE_CAP}
    assert not too_big, f"modules over {MODULE_CAP} lines: {too_big}"
    assert sum(sizes.values()) <= PACKAGE_CAP


def test_every_module_has_a_layer():
    missing = {_area(p) for p in _modules()} - set(LAYERS)
    assert not missing, f"add these to LAYERS: {missing}"


def test_no_upward_imports():
    bad = []
    for path in _modules():
        mine = LAYERS[_area(path)]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                if parts[0] != "pellucid" or len(parts) < 2:
                    continue
                theirs = LAYERS.get(parts[1], 0)
                if theirs > mine:
                    bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, bad


def _forbidden(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(
            a.name in ("pickle", "cPickle", "dill") for a in node.names
        ):
            found.append("import pickle")
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill"):
            found.append("from pickle import")
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            # Only the builtins: `model.eval()` is a method, not code execution.
            if isinstance(fn, ast.Name) and name in ("exec", "eval"):
                found.append(name)
            if (
                name == "load"
                and isinstance(fn, ast.Attribute)
                and getattr(fn.value, "id", "") == "torch"
            ):
                safe = any(
                    k.arg == "weights_only" and getattr(k.value, "value", None) is True
                    for k in node.keywords
                )
                if not safe:
                    found.append("torch.load without weights_only=True")
            if (
                name == "save"
                and isinstance(fn, ast.Attribute)
                and getattr(fn.value, "id", "") == "torch"
            ):
                found.append("torch.save (pickle)")
            if any(
                k.arg == "allow_pickle" and getattr(k.value, "value", None) is True
                for k in node.keywords
            ):
                found.append("allow_pickle=True")
    return found


def test_no_pickle_exec_or_unsafe_load():
    bad = {
        str(p.relative_to(PKG)): f
        for p in _modules()
        if (f := _forbidden(ast.parse(p.read_text())))
    }
    assert not bad, bad


def test_the_scan_catches_what_it_should():
    src = "import torch, pickle\ntorch.load('x')\nexec('1')\nimport numpy as np\nnp.load('a', allow_pickle=True)\n"
    found = _forbidden(ast.parse(src))
    assert {
        "import pickle",
        "torch.load without weights_only=True",
        "exec",
        "allow_pickle=True",
    } <= set(found)
    assert _forbidden(ast.parse("model.eval()\n")) == []
    assert _forbidden(ast.parse("import torch\ntorch.load('x', weights_only=True)\n")) == []
