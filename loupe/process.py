"""What every loupe child process does first, and how it reports that it is ready."""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
EXIT_LOST_PEER = 3  # a rank whose peers went away (another node stopped or died)


def setup_child(name: str, log_level: str = "info") -> None:
    """Die with the parent (no orphans), leave Ctrl-C to the parent, log with our name."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the child still exits when its parent's pipes close
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_quietly)
    # Once exiting (the supervisor's SIGTERM can land in another library's exit handler),
    # a SIGTERM must not raise into that handler: we are on the way out already.
    atexit.register(signal.signal, signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level, name)


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
