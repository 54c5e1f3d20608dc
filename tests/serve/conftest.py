"""Fixtures for the serve tests; the server process helper is tests.helpers.ServerProcess."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ServerProcess


@pytest.fixture(scope="session")
def tiny_server(tiny_ckpt):
    """The torch backend on the tiny checkpoint, shared by the read-only server tests."""
    srv = ServerProcess(tiny_ckpt, "--max-batch-size", "8", "--max-queue", "32", "--model-name", "tiny")
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.output()


# Iterating on these tests without retraining: HOTPATH_TINY_CKPT=path/to/tiny.pt (trained with the same flags as
# tests/conftest.py's tiny_ckpt) replaces the session's freshly trained tiny checkpoint for tests/serve only.
_PRETRAINED_TINY = os.environ.get("HOTPATH_TINY_CKPT")
if _PRETRAINED_TINY:
    @pytest.fixture(scope="session")
    def tiny_ckpt():
        return Path(_PRETRAINED_TINY)
