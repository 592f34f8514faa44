import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # tests/ (tiny_models, assertions, otlp_receivers) and harness
# NIXL's UCX also uses the machine's external interface unless told otherwise: the tests'
# prefill and decode servers (and their KV) stay on loopback.
os.environ.setdefault("UCX_NET_DEVICES", "lo")
# The tests' OTLP gRPC receivers run in this process, and the harness forks (preexec_fn) to start
# servers and the router. gRPC's fork handlers then run in the child between fork and exec and can
# abort it ("epoll_wait error: Bad file descriptor"); the children exec at once and need none of them.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from harness import LiveProcess, LiveServer, free_port  # noqa: E402

from tiny_models import write_tiny_model  # noqa: E402

FAST = "not slow"  # `make test-fast`'s selection


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a server, runs the bundled model, or takes over ~10 s "
                                       "otherwise (left out of `make test-fast`; see tests/README.md)")
    if config.getoption("markexpr") == FAST:
        LiveProcess.start = _refuse_to_start


def _refuse_to_start(process: LiveProcess) -> None:
    raise AssertionError(f"{process.name} started in `make test-fast`: a test that starts a server "
                         "must be marked slow (tests/README.md)")


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
    return free_port()


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory):
    return str(tmp_path_factory.mktemp("server-logs"))


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
def bundled_server(server_logs):
    """The bundled SmolLM2-135M-Instruct GGUF, default flags (its decode step compiled). Shared:
    tests must leave it idle."""
    with LiveServer(log_dir=server_logs, compile=True) as server:
        yield server


@pytest.fixture(scope="module")
def receiver():
    """A real OTLP gRPC receiver on loopback, shared by a module's traced servers."""
    from otlp_receivers import GrpcReceiver

    with GrpcReceiver() as r:
        yield r
