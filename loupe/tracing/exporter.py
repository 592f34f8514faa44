"""The span exporter process: span tuples in, OTLP out.

Serving processes send `SpanBatch`es here. This process turns them into OpenTelemetry
`ReadableSpan`s, holds at most `OTEL_BSP_MAX_QUEUE_SIZE` of them (dropping and counting
the rest), and a worker thread exports batches over OTLP gRPC or HTTP every
`schedule_delay` or whenever a full batch is waiting. On SIGTERM it exports what is
queued, then exits. It runs at low CPU priority: serving comes first.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import Connection

import zmq

from loupe import ipc
from loupe.process import setup_child
from loupe.tracing.ids import new_span_id
from loupe.tracing.recorder import SERVER
from loupe.tracing.settings import ExportSettings

logger = logging.getLogger(__name__)
STATS_EVERY_S = 1.0
WARN_EVERY_S = 10.0
SHUTDOWN_EXPORT_S = 5.0


def make_exporter(settings: ExportSettings):
    """The SDK's OTLP exporter; headers, timeout and compression come from its own env vars."""
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not settings.endpoint.startswith("https://")
        return OTLPSpanExporter(endpoint=settings.endpoint, insecure=insecure)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint)


def make_resource():
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    return Resource.create({} if named else {SERVICE_NAME: "loupe"})


class SpanBuilder:
    """Span tuples -> ReadableSpans."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.trace, self.Event, self.ReadableSpan = trace, Event, ReadableSpan
        self.resource = make_resource()
        self.scope = InstrumentationScope("loupe")
        self.sampled = trace.TraceFlags(trace.TraceFlags.SAMPLED)
        self.ok, self.error = trace.Status(trace.StatusCode.UNSET), trace.StatusCode.ERROR

    def build(self, record: tuple, offset: int):
        (trace_id, span_id, parent_id, name, start, end, attributes, events, error, kind,
         tracestate, remote_parent) = record
        t = self.trace
        state = t.TraceState.from_header([tracestate]) if tracestate else None
        context = t.SpanContext(trace_id, span_id, False, self.sampled, state)
        parent = t.SpanContext(trace_id, parent_id, remote_parent, self.sampled, state) if parent_id else None
        return self.ReadableSpan(
            name=name, context=context, parent=parent, resource=self.resource, attributes=attributes,
            events=[self.Event(n, a, ts + offset) for n, ts, a in events or ()],
            kind=t.SpanKind.SERVER if kind == SERVER else t.SpanKind.INTERNAL,
            status=t.Status(self.error, error) if error else self.ok,
            start_time=start + offset, end_time=end + offset, instrumentation_scope=self.scope,
        )


class ExporterProcess:
    def __init__(self, settings: ExportSettings, ipc_dir: str):
        self.settings = settings
        self.exporter = make_exporter(settings)
        self.builder = SpanBuilder()
        ctx = zmq.Context()
        self.inbox = ipc.bind(ctx, zmq.PULL, ipc.endpoint(ipc_dir, "tracing"))
        self.to_manager = ipc.connect(ctx, zmq.PUSH, ipc.endpoint(ipc_dir, "manager"))
        self.queue: deque = deque()
        self.wakeup = threading.Event()
        self.stopping = False
        self.exported = self.dropped = self.failed = 0
        self.warned_dropped, self.last_warning = 0, 0.0

    def run_forever(self) -> None:
        worker = threading.Thread(target=self.export_loop, name="otlp-export", daemon=True)
        worker.start()
        last_stats, reported = 0.0, None
        while not self.stopping:
            if self.inbox.poll(100):
                self.receive_all()
            now = time.monotonic()
            if now - last_stats >= STATS_EVERY_S:
                stats = ipc.ExporterStats(self.exported, self.dropped, self.failed)
                if stats != reported:
                    ipc.send(self.to_manager, stats)
                    reported = stats
                last_stats = now
                self.warn_about_drops(now)
        self.receive_all()  # what the serving processes flushed while stopping
        self.wakeup.set()
        worker.join(SHUTDOWN_EXPORT_S)
        self.exporter.shutdown()
        ipc.send(self.to_manager, ipc.ExporterStats(self.exported, self.dropped, self.failed))

    def receive_all(self) -> None:
        while True:
            try:
                batch = ipc.recv(self.inbox, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.add(batch)

    def add(self, batch: ipc.SpanBatch) -> None:
        self.dropped += batch.dropped
        build, offset = self.builder.build, batch.offset_ns
        for record in batch.spans:
            self.enqueue(build(record, offset))
        for name, start, end, attributes, parents in batch.fanouts:
            for trace_id, parent_id in parents:
                record = (trace_id, new_span_id(), parent_id, name, start, end, attributes, None, None, 0, None, False)
                self.enqueue(build(record, offset))

    def enqueue(self, span) -> None:
        if len(self.queue) >= self.settings.max_queue_size:
            self.dropped += 1
            return
        self.queue.append(span)
        if len(self.queue) >= self.settings.max_export_batch_size:
            self.wakeup.set()

    def export_loop(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        delay = self.settings.schedule_delay_ms / 1000
        size = self.settings.max_export_batch_size
        while True:
            self.wakeup.wait(delay)
            self.wakeup.clear()
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(size, len(self.queue)))]
                try:
                    ok = self.exporter.export(batch) == SpanExportResult.SUCCESS
                except Exception:  # an exporter bug must not stop the exporting
                    logger.exception("exporting spans failed")
                    ok = False
                if ok:
                    self.exported += len(batch)
                else:
                    self.failed += len(batch)
                if len(self.queue) < size and not self.stopping:
                    break  # wait for a full batch or the delay
            if self.stopping and not self.queue:
                return

    def warn_about_drops(self, now: float) -> None:
        if self.dropped > self.warned_dropped and now - self.last_warning >= WARN_EVERY_S:
            logger.warning("dropped %d spans so far (queue of %d full: is the OTLP backend at %s slow or down?)",
                           self.dropped, self.settings.max_queue_size, self.settings.endpoint)
            self.warned_dropped, self.last_warning = self.dropped, now


def run_exporter_process(settings: ExportSettings, ipc_dir: str, ready: Connection, log_level: str = "info") -> None:
    setup_child("exporter", log_level)
    os.nice(10)
    try:
        proc = ExporterProcess(settings, ipc_dir)
    except Exception as e:
        ready.send({"error": f"tracing exporter: {type(e).__name__}: {e}"})
        return

    def stop(*_) -> None:
        proc.stopping = True

    signal.signal(signal.SIGTERM, stop)
    ready.send({})
    proc.run_forever()
