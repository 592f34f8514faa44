"""OTLP JSON lines (the OpenTelemetry file-exporter format) into plain span records.

Each line is one `ExportTraceServiceRequest` in OTLP/JSON: ids as hex, 64-bit integers as
strings or numbers. A line that does not parse (the last one of a file still being written,
say) is skipped and counted. Spans read twice (overlapping files) count once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SERVER_KIND = 2
STATUS_ERROR = 2


@dataclass(slots=True)
class Event:
    name: str
    time: int  # epoch ns
    attributes: dict


@dataclass(slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start: int  # epoch ns
    end: int
    kind: int = 1
    attributes: dict = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    status: int = 0  # 0 unset, 1 OK, 2 ERROR
    status_message: str = ""
    service: str = ""

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / 1e9

    @property
    def is_request(self) -> bool:
        """A loupe server's root span of one request: `Req {rid}`."""
        return self.kind == SERVER_KIND and self.name.startswith("Req ")


@dataclass
class SpanFile:
    """Every span read, by trace id, and the lines that could not be read."""

    traces: dict[str, list[Span]] = field(default_factory=dict)
    bad_lines: int = 0


def value(any_value: dict):
    """An OTLP/JSON AnyValue as a Python value."""
    for key, item in any_value.items():
        if key == "intValue":
            return int(item)
        if key == "arrayValue":
            return [value(v) for v in item.get("values", ())]
        if key == "kvlistValue":
            return attributes(item.get("values", ()))
        return item  # stringValue, boolValue, doubleValue, bytesValue (base64 text)
    return None


def attributes(pairs: Iterable[dict]) -> dict:
    return {kv["key"]: value(kv.get("value", {})) for kv in pairs}


def spans_of(request: dict) -> Iterable[Span]:
    for resource_spans in request.get("resourceSpans", ()):
        resource = attributes(resource_spans.get("resource", {}).get("attributes", ()))
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for s in scope_spans.get("spans", ()):
                status = s.get("status", {})
                yield Span(
                    s["traceId"].lower(), s["spanId"].lower(), s.get("parentSpanId", "").lower() or None,
                    s.get("name", ""), int(s.get("startTimeUnixNano", 0)), int(s.get("endTimeUnixNano", 0)),
                    s.get("kind", 1), attributes(s.get("attributes", ())),
                    [Event(e.get("name", ""), int(e.get("timeUnixNano", 0)), attributes(e.get("attributes", ())))
                     for e in s.get("events", ())],
                    status.get("code", 0), status.get("message", ""), service)


def read_files(paths: Iterable[str], advance: Callable[[int], None] | None = None) -> SpanFile:
    """Read OTLP JSON lines files; `advance(n)` is told each n bytes read (a progress bar)."""
    out = SpanFile()
    seen: set[tuple[str, str]] = set()
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                if advance is not None:
                    advance(len(line))
                if not line.strip():
                    continue
                try:
                    spans = list(spans_of(json.loads(line)))
                except (ValueError, KeyError, TypeError, AttributeError):
                    out.bad_lines += 1
                    continue
                for span in spans:
                    if (span.trace_id, span.span_id) not in seen:
                        seen.add((span.trace_id, span.span_id))
                        out.traces.setdefault(span.trace_id, []).append(span)
    return out
