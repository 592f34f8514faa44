"""OTLP JSON lines (the OpenTelemetry file-exporter format) into plain span records.

Each line is one `ExportTraceServiceRequest` in OTLP/JSON: ids as hex, 64-bit integers as
strings or numbers. A line that does not parse (the last one of a file still being written,
say) is skipped and counted. Spans read twice (overlapping files) count once.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from sys import intern

SERVER_KIND = 2
STATUS_ERROR = 2
NO_VALUE: dict = {}


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
    if "stringValue" in any_value:  # the commonest first
        return any_value["stringValue"]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    if "arrayValue" in any_value:
        return [value(v) for v in any_value["arrayValue"].get("values", ())]
    if "kvlistValue" in any_value:
        return attributes(any_value["kvlistValue"].get("values", ()))
    return next(iter(any_value.values()), None)  # boolValue, doubleValue, bytesValue (base64 text)


def attributes(pairs: Iterable[dict]) -> dict:
    """Attributes by key, the keys interned (a large file repeats a few keys millions of times)."""
    return {intern(kv["key"]): value(kv.get("value", NO_VALUE)) for kv in pairs}


def spans_of(request: dict) -> Iterable[Span]:
    """The spans of one export. Their names and trace and parent ids are interned: the spans of
    a large file share a few names, and each id is repeated by many spans."""
    for resource_spans in request.get("resourceSpans", ()):
        resource = attributes(resource_spans.get("resource", {}).get("attributes", ()))
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for s in scope_spans.get("spans", ()):
                status = s.get("status", {})
                parent = s.get("parentSpanId", "").lower()
                yield Span(
                    intern(s["traceId"].lower()), s["spanId"].lower(), intern(parent) if parent else None,
                    intern(s.get("name", "")), int(s.get("startTimeUnixNano", 0)), int(s.get("endTimeUnixNano", 0)),
                    s.get("kind", 1), attributes(s.get("attributes", ())),
                    [Event(intern(e.get("name", "")), int(e.get("timeUnixNano", 0)), attributes(e.get("attributes", ())))
                     for e in s.get("events", ())],
                    status.get("code", 0), status.get("message", ""), service)


def read_files(paths: Iterable[str], advance: Callable[[int], None] | None = None) -> SpanFile:
    """Read OTLP JSON lines files; `advance(n)` is told each n bytes read (a progress bar)."""
    out = SpanFile()
    with collector_off():
        for line in lines_of(paths, advance):
            try:
                spans = list(spans_of(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError):
                out.bad_lines += 1
                continue
            for span in spans:
                out.traces.setdefault(span.trace_id, []).append(span)
    out.traces = {trace_id: once(spans) for trace_id, spans in out.traces.items()}
    return out


def lines_of(paths: Iterable[str], advance: Callable[[int], None] | None) -> Iterator[bytes]:
    """The lines of the files that are not blank."""
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                if advance is not None:
                    advance(len(line))
                if not line.isspace():
                    yield line


@contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector off: reading makes millions of objects and frees none, so
    each of its passes would walk them all again to find nothing (on a 1 GB file that took
    longer than the reading itself). Back as it was after."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def once(spans: list[Span]) -> list[Span]:
    """A trace's spans, each once: a span read again (overlapping files) counts once."""
    by_id = {s.span_id: s for s in spans}
    return spans if len(by_id) == len(spans) else list(by_id.values())
