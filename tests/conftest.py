import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# NIXL's UCX also uses the machine's external interface unless told otherwise: the tests'
# prefill and decode servers (and their KV) stay on loopback.
os.environ.setdefault("UCX_NET_DEVICES", "lo")
# The tests' OTLP gRPC receivers run in this process, and the harness forks (preexec_fn) to start
# servers and the router. gRPC's fork handlers then run in the child between fork and exec and can
# abort it ("epoll_wait error: Bad file descriptor"); the children exec at once and need none of them.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from tiny_models import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: the folder of a tiny random checkpoint of a family, written once per session."""
    cache = {}

    def make(family: str = "llama") -> str:
        if family not in cache:
            cache[family] = write_tiny_model(str(tmp_path_factory.mktemp(f"tiny-{family}")), family)
        return cache[family]

    return make


@pytest.fixture
def unused_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory):
    return str(tmp_path_factory.mktemp("server-logs"))


@pytest.fixture(scope="session")
def bundled_server(server_logs):
    """The bundled SmolLM2-135M-Instruct GGUF, default flags (its decode step compiled). Shared:
    tests must leave it idle."""
    from server_harness import serving

    with serving(log_dir=server_logs, compile=True) as server:
        yield server


@pytest.fixture(scope="module")
def receiver():
    """A real OTLP gRPC receiver on loopback, shared by a module's traced servers."""
    from otlp_receivers import GrpcReceiver

    r = GrpcReceiver()
    yield r
    r.stop()
