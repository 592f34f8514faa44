"""Span tuples straight to OTLP protobuf, and the SDK's OTLP transports to send them.

The exporter process used to build an SDK `ReadableSpan` per span and let the SDK encode
it: most of its CPU time per span went there. Here the queued tuples become one
`ExportTraceServiceRequest` directly. A decode-step fan-out (one slice, one span per request
in the batch) is encoded once and copied per request, with its own span id.

gRPC requests go out through loupe's own sender (tracing/grpc_export.py). HTTP ones go
through the SDK's OTLP/HTTP exporter, so its environment variables (headers, timeout,
compression, certificates), TLS and retries apply: a small mixin hands it the built
request through a private hook, there since 1.45; the package is pinned below 2 in
pyproject.toml, and `SdkHttpSender` refuses to start, saying so, where the hook is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache

from opentelemetry.exporter.otlp.proto.http import trace_exporter as sdk_http
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags, Status
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import TraceState

from loupe.tracing.ids import new_span_id
from loupe.tracing.recorder import SERVER, Fanout, SpanRecord

SPAN_SERVER, SPAN_INTERNAL = Span.SpanKind.SPAN_KIND_SERVER, Span.SpanKind.SPAN_KIND_INTERNAL
# Every exported span is sampled (W3C flag 01); the context bits say whether the parent is remote.
LOCAL_PARENT = 0x01 | SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
REMOTE_PARENT = LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
# What Arize Phoenix (OpenInference) shows as a span's kind: the request is the LLM call,
# the spans inside it steps of it.
OUTCOME = "loupe.request.outcome"  # the root's
LLM_KIND = KeyValue(key="openinference.span.kind", value=AnyValue(string_value="LLM"))
CHAIN_KIND = KeyValue(key="openinference.span.kind", value=AnyValue(string_value="CHAIN"))


def set_value(target: AnyValue, value: object) -> None:
    """An attribute value as a typed AnyValue: str, bool, int, float, bytes, or a list or
    tuple of those (an ArrayValue); None stays empty and anything else becomes its str()."""
    kind = type(value)
    if kind is str:
        target.string_value = value
    elif kind is int:
        target.int_value = value
    elif kind is float:
        target.double_value = value
    elif kind is bool:
        target.bool_value = value
    elif isinstance(value, list | tuple):
        array = target.array_value
        array.SetInParent()  # an empty list is still an array
        for item in value:
            set_value(array.values.add(), item)
    elif isinstance(value, str):  # subclasses, such as str or int enums
        target.string_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif value is not None:
        target.string_value = str(value)


def set_attributes(target, attributes: Mapping[str, object]) -> None:
    """Append `attributes` as KeyValues to a repeated field."""
    for key, value in attributes.items():
        kv = target.add()
        kv.key = key
        try:
            set_value(kv.value, value)
        except (TypeError, ValueError):  # an int beyond 64 bits, say
            kv.value.string_value = str(value)


@lru_cache(maxsize=1024)
def normalize_tracestate(header: str) -> str:
    """A W3C tracestate as the SDK would send it: invalid members or headers are dropped."""
    return ",".join(f"{k}={v}" for k, v in TraceState.from_header([header]).items())


def encode_span(span: Span, record: SpanRecord, offset: int) -> None:
    """Fill `span` from a SpanRecord; `offset` turns its times into epoch ns."""
    span.trace_id = record.trace_id.to_bytes(16, "big")
    span.span_id = record.span_id.to_bytes(8, "big")
    if record.parent_id:
        span.parent_span_id = record.parent_id.to_bytes(8, "big")
    span.name = record.name
    span.kind = SPAN_SERVER if record.kind == SERVER else SPAN_INTERNAL
    span.start_time_unix_nano = record.start + offset
    span.end_time_unix_nano = record.end + offset
    span.flags = REMOTE_PARENT if record.remote_parent else LOCAL_PARENT
    if record.tracestate:
        span.trace_state = normalize_tracestate(record.tracestate)
    if record.attributes:
        set_attributes(span.attributes, record.attributes)
    for event_name, at, event_attributes in record.events or ():
        event = span.events.add()
        event.name = event_name
        event.time_unix_nano = at + offset
        if event_attributes:
            set_attributes(event.attributes, event_attributes)
    if record.error:
        span.status.code = Status.StatusCode.STATUS_CODE_ERROR
        span.status.message = record.error
    elif record.kind == SERVER and record.attributes and record.attributes.get(OUTCOME) == "completed":
        span.status.code = Status.StatusCode.STATUS_CODE_OK  # a request that succeeded says so; a cancelled
        # or refused one (a client's 4xx), like the inner spans, stays unset
    span.attributes.append(LLM_KIND if record.kind == SERVER else CHAIN_KIND)


def fanout_template(fanout: Fanout, offset: int) -> Span:
    """What the spans of one Fanout have in common: all but the three ids."""
    span = Span(name=fanout.name, kind=SPAN_INTERNAL, start_time_unix_nano=fanout.start + offset,
                end_time_unix_nano=fanout.end + offset, flags=LOCAL_PARENT)
    if fanout.attributes:
        set_attributes(span.attributes, fanout.attributes)
    span.attributes.append(CHAIN_KIND)
    return span


class SpanEncoder:
    """Queued spans -> one ExportTraceServiceRequest (one resource, scope "loupe").

    A queued span is `(record, offset_ns)` for a SpanRecord, or
    `(fanout, offset_ns, (trace_id, parent_span_id, step or None))` for one request of a Fanout.
    """

    def __init__(self, resource_attributes: Mapping[str, object]) -> None:
        self.resource = Resource()
        set_attributes(self.resource.attributes, resource_attributes)
        self.scope = InstrumentationScope(name="loupe")

    def encode(self, items: Iterable[tuple]) -> ExportTraceServiceRequest:
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.CopyFrom(self.resource)
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.CopyFrom(self.scope)
        add = scope_spans.spans.add
        templates: dict[int, Span] = {}  # by id() of the fanout tuple, alive while `items` is
        for item in items:
            if len(item) == 2:
                encode_span(add(), *item)
                continue
            fanout, offset, (trace_id, parent_id, step) = item
            template = templates.get(id(fanout))
            if template is None:
                template = templates[id(fanout)] = fanout_template(fanout, offset)
            span = add()
            span.MergeFrom(template)
            span.trace_id = trace_id.to_bytes(16, "big")
            span.span_id = new_span_id().to_bytes(8, "big")
            span.parent_span_id = parent_id.to_bytes(8, "big")
            if step is not None:
                kv = span.attributes.add()
                kv.key, kv.value.int_value = "step", step
        return request


class SdkHttpSender:
    """Mixed into one of the SDK's OTLP/HTTP exporters, it sends requests built here. Hook:
    since 1.45 their `export()` encodes the SDK's own objects and hands the bytes to
    `self._client.export`, the shared OTLP HTTP client that compresses, retries and applies
    headers, timeout and TLS."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint=endpoint)
        if not callable(getattr(getattr(self, "_client", None), "export", None)):
            from importlib.metadata import version

            raise RuntimeError("OTLP http/protobuf export needs opentelemetry-exporter-otlp-proto-http>=1.45,<2 "
                               f"(installed: {version('opentelemetry-exporter-otlp-proto-http')})")

    def export(self, request) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        result = self._client.export(request.SerializeToString())
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE


class HttpExporter(SdkHttpSender, sdk_http.OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, sending ExportTraceServiceRequests built here."""
