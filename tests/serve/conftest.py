"""Fixtures for the HTTP server tests: the main toy server (one subprocess for the session) and a reference engine
in this process for token-for-token comparisons. The test modules that need the serve extra (FastAPI, uvicorn)
skip themselves with pytest.importorskip when it is absent."""
import os

import pytest

from rast_kernels.toy.common import DEFAULT_OUT, ROLES
from serve_helpers import running_server

MAIN_ARGS = ("--max-batch-size", "16", "--max-seq-len", "512")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("srv"), *MAIN_ARGS) as srv:
        yield srv


@pytest.fixture(scope="session")
def ref_engine():
    """A fresh engine in this process over the same trio (tokens do not depend on batch or pool sizes)."""
    from rast_kernels import RastEngine

    return RastEngine(*[os.path.join(DEFAULT_OUT, r) for r in ROLES], max_batch_size=16, max_seq_len=512)


