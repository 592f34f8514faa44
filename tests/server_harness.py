"""Start and stop live loupe servers (`python -m loupe.launch_server`) for the HTTP tests.

A server runs as a subprocess on a free loopback port; its output goes to a log file.
`stop()` sends SIGTERM, kills it if it lingers, and kills any of its descendants that
survive, so no test leaves a process behind (an atexit hook covers the worst case).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_NAME = "SmolLM2-135M-Instruct"
READY_TIMEOUT = 240  # seconds; the machines running these tests can be slow and shared
COMPILE_READY_TIMEOUT = 480  # and for a server that compiles its decode step first (70-120 s cold here)
STOP_TIMEOUT = 20

_live: set[LiveServer] = set()
try:  # loaded before any fork: the child only calls it
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux
    _libc = None


def _die_with_parent() -> None:
    """In the server process, before exec: get SIGTERM if the test process dies, even by SIGKILL
    (the server then stops its own children)."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_pids(pids) -> list[int]:
    """Those of `pids` that still run (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def server_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "loupe.launch_server", *map(str, args)]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}


class LiveServer:
    """A server process. It runs eagerly (`--enforce-eager`) unless `compile`: compiling the
    bundled model's decode step takes 15-90 s at start, paid by the shared server and a few others."""

    def __init__(self, *args: object, log_dir: str, port: int | None = None, api_key: str | None = None,
                 env: dict[str, str] | None = None, compile: bool = False):
        self.env = env
        self.port = port or free_port()
        self.api_key = api_key
        extra = ["--api-key", api_key] if api_key else []
        extra += [] if compile else ["--enforce-eager"]
        self.command = server_command("--port", self.port, *args, *extra)
        self.log_path = os.path.join(log_dir, f"loupe-server-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self.ready_timeout = COMPILE_READY_TIMEOUT if compile else READY_TIMEOUT
        self.probes: list[tuple[float, str, int | None, str]] = []  # (seconds, path, status, body) at start-up
        self.known_pids: set[int] = set()

    # ---- addresses ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, trust_env=False)

    # ---- life -----------------------------------------------------------------------------

    def start(self) -> LiveServer:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env=server_env(self.env), start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.known_pids.add(self.proc.pid)
        _live.add(self)
        return self

    def wait_ready(self, timeout: float | None = None, probe: str | None = "/v1/models") -> LiveServer:
        """Poll /health until 200. Meanwhile GET `probe` (with the API key) each round and
        record what it answered, to show how the server answers while it starts."""
        timeout = timeout or self.ready_timeout
        start = time.monotonic()
        with httpx.Client(timeout=5, trust_env=False) as http:
            while True:
                elapsed = time.monotonic() - start
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited with {self.proc.returncode} while starting:\n{self.log()}")
                if elapsed > timeout:
                    raise AssertionError(f"the server was not ready within {timeout} s:\n{self.log()}")
                if probe:
                    try:
                        r = http.get(self.url(probe), headers=self.headers)
                        self.probes.append((elapsed, probe, r.status_code, r.text))
                    except httpx.TransportError:
                        self.probes.append((elapsed, probe, None, ""))
                try:
                    r = http.get(self.url("/health"))
                    self.probes.append((elapsed, "/health", r.status_code, r.text))
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    self.probes.append((elapsed, "/health", None, ""))
                time.sleep(0.05)
        self.ready_seconds = time.monotonic() - start
        self.known_pids |= set(self.descendants())
        return self

    def descendants(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def alive_pids(self) -> list[int]:
        """Known pids (the main process and every child seen) that still run."""
        return alive_pids(self.known_pids)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_all_gone(self, timeout: float) -> list[int]:
        """Wait until the main process and all its known children are gone; the ones left."""
        deadline = time.monotonic() + timeout
        while self.alive_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.alive_pids()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.known_pids |= set(self.descendants())
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(STOP_TIMEOUT) is None:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.wait_all_gone(5):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        _live.discard(self)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_log(self, text: str, timeout: float) -> bool:
        """Whether `text` appears in the log within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@contextlib.contextmanager
def serving(*args: object, log_dir: str, compile: bool = False) -> Iterator[LiveServer]:
    """A server with these flags, ready, stopped on leaving."""
    server = LiveServer(*args, log_dir=log_dir, compile=compile).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop()


# ---- small helpers shared by the tests ---------------------------------------------------


def read_metrics(server: LiveServer) -> dict[str, float]:
    """Samples of /metrics: {'name{labels}': value}."""
    r = httpx.get(server.url("/metrics"), headers=server.headers, timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def wait_metrics(server: LiveServer, predicate, timeout: float = 15) -> dict[str, float]:
    """Poll /metrics until `predicate(samples)` holds; the last samples either way."""
    deadline = time.monotonic() + timeout
    while True:
        samples = read_metrics(server)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = ...) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not ...:
        assert error["param"] == param, error
    return error


def sse_events(response: httpx.Response) -> list:
    """The JSON events of a server-sent event stream, up to `data: [DONE]` (which must come)."""
    import json

    events, done = [], False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        events.append(json.loads(data))
    assert done, "the stream did not end with data: [DONE]"
    return events


def kill_child_and_expect_shutdown(server: LiveServer, process_name: str) -> None:
    """SIGKILL the server's child `process_name` (as its log lines name it): the server must
    exit non-zero with a message naming it, leaving no process behind."""
    found = re.search(rf"\[{re.escape(process_name)} pid:(\d+)\]", server.log())
    assert found, server.log()
    os.kill(int(found.group(1)), signal.SIGKILL)
    assert server.wait_exit(30) not in (None, 0)
    assert f"the {process_name} process (pid {found.group(1)}) died" in server.log()
    assert server.wait_all_gone(15) == []


class LiveRouter:
    """SGLang's router (`sglang-router`, a Rust binary) on loopback in front of loupe servers.
    `args`: its mode and workers, e.g. `--worker-urls URL URL --policy round_robin`."""

    def __init__(self, *args: object, log_dir: str):
        self.port, self.prometheus_port = free_port(), free_port()
        self.command = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                        "--port", str(self.port), "--prometheus-host", "127.0.0.1",
                        "--prometheus-port", str(self.prometheus_port), *map(str, args)]
        self.log_path = os.path.join(log_dir, f"router-{self.port}.log")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, num_workers: int, timeout: float = 60) -> LiveRouter:
        """Start, then wait until it has registered `num_workers` healthy workers."""
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the router exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"the router had no {num_workers} healthy workers:\n{self.log()}"
            try:
                workers = httpx.get(self.base_url + "/workers", timeout=2, trust_env=False).json()["workers"]
                if len(workers) == num_workers and all(w["is_healthy"] for w in workers):
                    self.workers = workers
                    return self
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return re.sub(r"\x1b\[[0-9;]*m", "", f.read())
