"""Live servers for the HTTP tests: a factory for the tests that need a server of their own
(the shared bundled-model server is in tests/conftest.py)."""

import openai
import pytest
from server_harness import LiveServer


@pytest.fixture(scope="session")
def client(bundled_server):
    with openai.OpenAI(base_url=bundled_server.url("/v1"), api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def http(bundled_server):
    """An httpx client of the shared bundled-model server."""
    with bundled_server.client() as c:
        yield c


@pytest.fixture
def launch(server_logs):
    """Factory: start a server with the given flags (not waited on); all stopped at teardown."""
    started = []

    def start(*args, **kw) -> LiveServer:
        server = LiveServer(*args, log_dir=server_logs, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_flags(tiny_model_dir):
    """Flags for a fast server on a tiny random llama (with a small KV cache)."""
    return ["--model-path", tiny_model_dir("llama"), "--max-total-tokens", 4096]
