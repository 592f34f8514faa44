"""Trace and span ids that cannot collide across processes, even forked ones.

The OpenTelemetry SDK draws ids from Python's `random`, whose state a forked child copies
from its parent: two children then produce the same ids. Here every process seeds its own
generator from the OS on first use and again in every child after a fork.
"""

from __future__ import annotations

import os
import random

_rng = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))


def new_trace_id() -> int:
    """128-bit, never 0."""
    return _rng.getrandbits(128) or 1


def new_span_id() -> int:
    """64-bit, never 0."""
    return _rng.getrandbits(64) or 1
