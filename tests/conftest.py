from __future__ import annotations

import os

import pytest

# Tests never reach the Hub: everything they load is built in place or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def fake_server():
    from st_synth.testing import FakeOpenAIServer

    servers = []

    def start(**kwargs):
        server = FakeOpenAIServer(**kwargs).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
