"""How every loupe child process starts, reports that it is ready (or why it is not), and runs."""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
EXIT_LOST_PEER = 3  # a rank whose peers went away (another node stopped or died)
EXIT_PARENT_DIED = 4
# Sent by the kernel to each child when the main process dies. A catchable signal, so that
# the child can say why it stops; every child returns to Python within a step.
PARENT_DIED = signal.SIGUSR1
logger = logging.getLogger(__name__)


@dataclass
class Ready:
    """A child's report, over its start-up pipe, that it serves. `info`: what the launcher
    needs from it (a scheduler's ModelInfo), None for the others."""

    info: Any = None
    phases: list = field(default_factory=list)  # (name, start, end perf_counter_ns, attributes) of its start


@dataclass
class StartFailed:
    error: str  # one line


def run_child(name: str, log_level: str, ready: Connection, build: Callable[..., Any], *args: Any) -> None:
    """The body of every child process: set up, build the process's object from `args`, report
    `Ready` (with the object's `ready_info`, if it has one) or `StartFailed` (a bad model
    path, out of memory...), then serve until stopped."""
    setup_child(name, log_level)
    started = time.perf_counter_ns()
    try:
        child = build(*args)
    except Exception as e:
        logger.debug("%s failed to start", name, exc_info=True)
        ready.send(StartFailed(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))
        return
    phases = [("build", started, time.perf_counter_ns(), {}), *getattr(child, "startup_phases", ())]
    ready.send(Ready(getattr(child, "ready_info", None), phases))
    child.run_forever()


def setup_child(name: str, log_level: str = "info") -> None:
    """Die with the parent (no orphans), leave Ctrl-C to the parent, log with our name and
    take it as the process name (what ps, top and psutil show; Linux keeps 15 bytes)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, PARENT_DIED)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
    except OSError:  # not Linux: the child still exits when its parent's pipes close
        pass
    parent = os.getppid()
    signal.signal(PARENT_DIED, lambda *_: parent_died(parent))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_quietly)
    # Once exiting (the supervisor's SIGTERM can land in another library's exit handler),
    # a SIGTERM must not raise into that handler: we are on the way out already.
    atexit.register(signal.signal, signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level, name)


def parent_died(parent: int) -> None:
    """The main process is gone (killed: it would have stopped us itself otherwise), and with
    it the HTTP server and the tokenizer: say so, since nothing else can, and go. The signal
    also comes when only the thread that started us ends (a span exporter started again by
    the supervisor's thread, at shutdown): the parent is still ours then, and we stay."""
    if os.getppid() == parent:
        return
    logger.error("loupe: the main process (pid %d) died; stopping", parent)
    os._exit(EXIT_PARENT_DIED)


def exit_quietly(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def configure_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s [{name} pid:{os.getpid()}] %(levelname)s %(message)s",
        force=True,
    )


def yield_to_serving() -> None:
    """Lowest CPU priority (nice 19): on a machine whose cores the model's threads fill, this
    process takes about 1.5% of a core when it must, instead of preempting them mid-step (a
    matmul thread team waits for its slowest member). SCHED_IDLE, tried, starved it for
    seconds under full load, and spans were dropped."""
    os.nice(19 - os.nice(0))


class HeapTrimmer:
    """Hands the heap's free pages back to the OS (glibc's `malloc_trim`) once the scheduler
    falls idle after work, and every `interval` seconds while it works. oneDNN keeps a matmul
    for each of the last 128 input shapes, each holding buffers as large as its rows (~1.5 MB
    for a 512-row prefill); under prompts of varied lengths the evicted ones' buffers stay in
    the heap, freed: an engine 40 prompts of new lengths past its warm-up held 55-60 MB more
    than after a trim (BENCHMARKS.md, "Memory under prompts of many lengths"). A trim takes
    5-20 ms. Does nothing where the C library is not glibc."""

    def __init__(self, interval: float = 10.0):
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        self.interval = interval
        self.last = time.monotonic()
        self.worked = False

    def __call__(self, working: bool) -> None:
        now = time.monotonic()
        self.worked = self.worked or working
        # after work: once it stops, or every interval while it goes on
        if self._trim is not None and self.worked and (not working or now - self.last >= self.interval):
            self._trim(0)
            self.last, self.worked = now, False
