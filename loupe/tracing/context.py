"""A request's tracing context: W3C traceparent in and out, and the plain carrier that
crosses process boundaries inside request messages."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


@dataclass(frozen=True)
class TraceContext:
    """What every process needs to attach its spans to a request's trace. Plain ints and
    strings, so it pickles into request messages without the OpenTelemetry SDK."""

    trace_id: int
    root_span_id: int
    level: int
    remote_parent_id: int | None = None  # the caller's span, from an inbound traceparent
    tracestate: str | None = None

    @classmethod
    def start(cls, level: int, traceparent: str | None = None, tracestate: str | None = None) -> TraceContext:
        parent = parse_traceparent(traceparent)
        if parent is None:
            return cls(new_trace_id(), new_span_id(), level)
        return cls(parent[0], new_span_id(), level, parent[1], tracestate or None)

    @property
    def traceparent(self) -> str:
        return format_traceparent(self.trace_id, self.root_span_id)
