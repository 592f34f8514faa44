"""Start a process that serves HTTP, wait until it is ready, keep its log, stop it on every path.

`LiveProcess` is what the loupe servers and SGLang's router (harness/servers.py) build on,
and what starts any other server a test or benchmark needs (llama-server, Phoenix). It runs
in its own session on loopback, its output in a log file. `stop()` sends SIGTERM and
SIGKILLs whatever of it (its children included) is still there after `stop_timeout`. It is
stopped on every path: leaving a `with` block, an explicit `stop()`, an atexit hook, and,
should the process that started it die even by SIGKILL, PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Self

import httpx
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_live: set[LiveProcess] = set()
try:  # loaded before any fork: the child only calls it
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux
    _libc = None


class NotReady(RuntimeError):
    """The process exited, or was not ready in time, while starting; the message holds its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_pids(pids: Iterable[int]) -> list[int]:
    """Those of `pids` that still run (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@functools.cache
def default_log_dir() -> str:
    """A folder for the logs of callers that name none; kept after the run."""
    return tempfile.mkdtemp(prefix="loupe-logs-")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the thread that started it dies, even by
    SIGKILL (a loupe server then stops its own children)."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LiveProcess:
    """`command`, serving HTTP on 127.0.0.1:`port`, ready once `ready_path` answers 200.
    Its log is `log_path`, or `<name>.log` in `log_dir`. `env`: its whole environment (None:
    this process's). Use it as a context manager (started, ready, stopped on leaving), or
    call `start()`, `wait_ready()` and `stop()`."""

    poll_seconds = 0.2  # between readiness checks

    def __init__(self, command: Sequence[object], *, name: str, port: int, ready_path: str = "/health",
                 log_dir: str | None = None, log_path: str | None = None, env: Mapping[str, str] | None = None,
                 ready_timeout: float = 120, stop_timeout: float = 20):
        self.command = [str(part) for part in command]
        self.name, self.port, self.ready_path = name, port, ready_path
        self.log_path = log_path or os.path.join(log_dir or default_log_dir(), f"{name}.log")
        self.env = None if env is None else dict(env)
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.known_pids: set[int] = set()  # the main process and every child seen, for stop()
        self.killed: list[int] = []  # those that stop() had to SIGKILL

    # ---- addresses ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def pid(self) -> int:
        return self.proc.pid

    # ---- life -----------------------------------------------------------------------------

    def start(self) -> Self:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.known_pids.add(self.proc.pid)
        _live.add(self)
        return self

    def is_ready(self, http: httpx.Client, elapsed: float) -> bool:
        """One readiness check, `elapsed` seconds after waiting began."""
        try:
            return http.get(self.url(self.ready_path)).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float | None = None) -> Self:
        """Check readiness until it holds; raise NotReady, with the log, if the process exits
        first or `timeout` (default: `ready_timeout`) passes."""
        timeout = timeout or self.ready_timeout
        start = time.monotonic()
        with httpx.Client(timeout=5, trust_env=False) as http:
            while True:
                elapsed = time.monotonic() - start
                if self.proc.poll() is not None:
                    raise NotReady(f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log()}")
                if elapsed > timeout:
                    raise NotReady(f"{self.name} was not ready within {timeout} s:\n{self.log()}")
                if self.is_ready(http, elapsed):
                    break
                time.sleep(self.poll_seconds)
        self.ready_seconds = time.monotonic() - start
        self.remember_children()
        return self

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def descendants(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def remember_children(self) -> None:
        self.known_pids |= set(self.descendants())

    def alive_pids(self) -> list[int]:
        """Known pids (the main process and every child seen) that still run."""
        return alive_pids(self.known_pids)

    def wait_exit(self, timeout: float) -> int | None:
        """The main process's exit status, or None if it still runs after `timeout` seconds."""
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
        """SIGTERM (not SIGINT: a shell may have started us with SIGINT ignored, and children
        inherit that); SIGKILL for whatever of it outlives `stop_timeout`, noted in `killed`.
        Safe to call again, or before `start()`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.remember_children()
            self.proc.send_signal(signal.SIGTERM)
        for pid in self.wait_all_gone(self.stop_timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
        self.proc.wait(10)
        self._log.close()
        _live.discard(self)

    # ---- its log --------------------------------------------------------------------------

    def log(self) -> str:
        """The log so far, without colour codes (SGLang's router colours its lines)."""
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return re.sub(r"\x1b\[[0-9;]*m", "", f.read())

    def wait_log(self, text: str, timeout: float) -> bool:
        """Whether `text` appears in the log within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@contextlib.contextmanager
def running(*processes: LiveProcess) -> Iterator[tuple[LiveProcess, ...]]:
    """Start all of `processes` at once (they start in parallel), wait until each is ready,
    and stop them all on leaving, the last first."""
    with contextlib.ExitStack() as stack:
        for process in processes:
            stack.callback(process.stop)
            process.start()
        for process in processes:
            process.wait_ready()
        yield processes


@atexit.register
def _stop_all() -> None:
    for process in list(_live):
        process.stop()
