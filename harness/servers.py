"""loupe servers (`python -m loupe.launch_server`) and SGLang's router as LiveProcesses, and
readers of what a live server answers (/metrics, server-sent events)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

import httpx

from harness.processes import REPO, LiveProcess, free_port

BUNDLED_NAME = "SmolLM2-135M-Instruct"
READY_TIMEOUT = 240  # seconds; the machines running these tests can be slow and shared
COMPILE_READY_TIMEOUT = 480  # and for a server that compiles its decode step first (70-120 s cold here)
STOP_TIMEOUT = 20


def server_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "loupe.launch_server", *map(str, args)]


def server_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with unbuffered output and `extra`."""
    return {**(os.environ if base is None else base), "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_server(*args: object, timeout: float, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """A server with these flags run to its end, its output captured: for the ones that must
    refuse to start."""
    return subprocess.run(server_command(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=server_env(env), stdin=subprocess.DEVNULL)


class LiveServer(LiveProcess):
    """A loupe server with these flags on a free port (or `port`): the bundled model unless
    the flags name another (`--model-path`). It runs eagerly (`--enforce-eager`) unless
    `compile`: compiling the bundled model's decode step takes 15-90 s at start. `env`: added
    to `base_env` (default: this process's environment).

    While it starts, `wait_ready` also GETs /v1/models (with the API key) each round and keeps
    what each probe answered in `probes`, to show how the server answers while it starts."""

    poll_seconds = 0.05

    def __init__(self, *args: object, log_dir: str | None = None, log_path: str | None = None,
                 port: int | None = None, api_key: str | None = None, env: Mapping[str, str] | None = None,
                 base_env: Mapping[str, str] | None = None, compile: bool = False,
                 ready_timeout: float | None = None):
        port = port or free_port()
        extra = ["--api-key", api_key] if api_key else []
        extra += [] if compile else ["--enforce-eager"]
        super().__init__(server_command("--port", port, *args, *extra), name=f"loupe-server-{port}", port=port,
                         log_dir=log_dir, log_path=log_path, env=server_env(env, base_env),
                         ready_timeout=ready_timeout or (COMPILE_READY_TIMEOUT if compile else READY_TIMEOUT),
                         stop_timeout=STOP_TIMEOUT)
        self.api_key = api_key
        self.probes: list[tuple[float, str, int | None, str]] = []  # (seconds, path, status, body) at start-up

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, trust_env=False)

    def served_model(self) -> str:
        """The name it serves its model under (the first of /v1/models)."""
        r = httpx.get(self.url("/v1/models"), headers=self.headers, timeout=10, trust_env=False)
        return r.json()["data"][0]["id"]

    def is_ready(self, http: httpx.Client, elapsed: float) -> bool:
        for path, headers in (("/v1/models", self.headers), ("/health", {})):
            try:
                r = http.get(self.url(path), headers=headers)
                self.probes.append((elapsed, path, r.status_code, r.text))
            except httpx.TransportError:
                self.probes.append((elapsed, path, None, ""))
        return self.probes[-1][2] == 200


class LiveRouter(LiveProcess):
    """SGLang's router (`sglang-router`, a Rust binary) on loopback in front of loupe servers,
    ready once it has `num_workers` healthy workers (then listed in `workers`). `args`: its
    mode and workers, e.g. `--worker-urls URL URL --policy round_robin`."""

    def __init__(self, *args: object, num_workers: int, log_dir: str | None = None, ready_timeout: float = 60):
        port, self.prometheus_port = free_port(), free_port()
        command = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", port,
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", self.prometheus_port, *args]
        super().__init__(command, name=f"router-{port}", port=port, log_dir=log_dir, ready_timeout=ready_timeout,
                         stop_timeout=10)
        self.num_workers = num_workers
        self.workers: list[dict] = []

    def is_ready(self, http: httpx.Client, elapsed: float) -> bool:
        try:
            workers = http.get(self.url("/workers"), timeout=2).json()["workers"]
        except (httpx.TransportError, ValueError, KeyError):
            return False
        self.workers = workers
        return len(workers) == self.num_workers and all(w["is_healthy"] for w in workers)


# ---- reading a live server ------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: {'name{labels}': value}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def read_metrics(server: LiveServer) -> dict[str, float]:
    """Samples of the server's /metrics."""
    r = httpx.get(server.url("/metrics"), headers=server.headers, timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)


def wait_metrics(server: LiveServer, predicate: Callable[[dict[str, float]], bool],
                 timeout: float = 15) -> dict[str, float]:
    """Poll /metrics until `predicate(samples)` holds; the last samples either way."""
    deadline = time.monotonic() + timeout
    while True:
        samples = read_metrics(server)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def sse_events(response: httpx.Response) -> list:
    """The JSON events of a server-sent event stream, up to `data: [DONE]` (which must come)."""
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
