"""A request's trace context from a W3C traceparent (the carrier itself is loupe.core.TraceContext)."""

from __future__ import annotations

import re
from collections.abc import Callable

from loupe.core import TraceContext, TraceDecision
from loupe.tracing.ids import new_span_id, new_trace_id

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?$")


def parse_traceparent(header: str | None) -> tuple[int, int, int] | None:
    """(trace_id, parent span id, flags) of a valid W3C traceparent; None for anything else."""
    if not header:
        return None
    match = _TRACEPARENT.match(header.strip().lower())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, int(flags_hex, 16)


def start_context(level: int, traceparent: str | None = None, tracestate: str | None = None,
                  decide: Callable[[int, int | None], TraceDecision] | None = None) -> TraceContext:
    """A new request's context: under the caller's span when `traceparent` is valid. `decide`
    (trace id, the caller's flags or None) makes its trace decision; without it, sampled."""
    trace_id, parent_id, flags = parse_traceparent(traceparent) or (new_trace_id(), None, None)
    decision = decide(trace_id, flags) if decide else TraceDecision.SAMPLED
    return TraceContext(trace_id, new_span_id(), level, decision, parent_id, (tracestate or None) if parent_id else None)
