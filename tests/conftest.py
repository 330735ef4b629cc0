"""Shared fixtures: an isolated PELLUCID_HOME, determinism, and GPU-test skipping."""

import os

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets its own empty cache, unless it opts into the shared one (see `real_home`)."""
    home = tmp_path_factory.mktemp("pellucid_home")
    monkeypatch.setenv("PELLUCID_HOME", str(home))
    return home


@pytest.fixture
def real_home(monkeypatch):
    """The user's cache (where CI keeps fetched corpora and models), for slow end-to-end tests."""
    home = os.environ.get("PELLUCID_TEST_HOME") or os.path.expanduser("~/.cache/pellucid")
    monkeypatch.setenv("PELLUCID_HOME", home)
    return home


@pytest.fixture(autouse=True)
def _restore_logging():
    """cli.main binds a log handler to the stderr of the test that ran it; drop it afterwards so
    later tests do not log into that test's closed capture stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)
