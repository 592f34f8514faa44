"""Clients of the shared bundled-model server (tests/conftest.py), and the flags of a fast
server on a tiny model for the tests that start their own (with `launch` or `LiveServer`)."""

import openai
import pytest


@pytest.fixture(scope="session")
def client(bundled_server):
    with openai.OpenAI(base_url=bundled_server.url("/v1"), api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def http(bundled_server):
    """An httpx client of the shared bundled-model server."""
    with bundled_server.client() as c:
        yield c


@pytest.fixture(scope="session")
def tiny_flags(tiny_model_dir):
    """Flags for a fast server on a tiny random llama (with a small KV cache)."""
    return ["--model-path", tiny_model_dir("llama"), "--max-total-tokens", 4096]
