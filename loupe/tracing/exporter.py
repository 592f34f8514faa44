"""The span exporter process: span tuples in, OTLP out.

Serving processes send `SpanBatch`es here. This process queues their spans, still as
tuples, holding at most `OTEL_BSP_MAX_QUEUE_SIZE` of them (dropping and counting the rest),
and a worker thread encodes batches of them to OTLP protobuf (tracing/otlp.py) and exports
them over gRPC or HTTP every `schedule_delay`, all that wait, back to back. On
SIGTERM it exports what is queued, then exits. It runs at low CPU priority: serving comes
first.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from urllib.parse import urlparse

import zmq

from loupe import ipc
from loupe.process import yield_to_serving
from loupe.tracing.settings import ExportSettings, MetricsSettings
from loupe.tracing.tail import TailKeeper

logger = logging.getLogger(__name__)
STATS_EVERY_S = 1.0
WARN_EVERY_S = 10.0
SHUTDOWN_EXPORT_S = 5.0
DRAIN_QUIET_S = 0.2  # at shutdown: no span batch for this long means every one has arrived
ENDPOINT_CHECK_S = 2.0


def make_exporter(settings: ExportSettings | MetricsSettings, signal: str = "traces"):
    """An OTLP exporter of built requests of `signal` ("traces" or "metrics"): loupe's own
    gRPC sender, the SDK's HTTP one, or OTLP JSON lines to a file (a file:// endpoint).
    Headers, timeout, compression and certificates come from the SDK's env vars for the
    signal; an https:// endpoint means TLS."""
    if settings.protocol == "file":
        from loupe.tracing.file_export import FileExporter, file_path

        return FileExporter(file_path(settings.endpoint), settings.file_max_bytes, settings.file_backups)
    if settings.protocol == "grpc":
        from loupe.tracing.grpc_export import GrpcExporter

        return GrpcExporter(settings.endpoint, signal)
    if signal == "metrics":
        from loupe.tracing.metrics_otlp import HttpMetricExporter

        return HttpMetricExporter(endpoint=settings.endpoint)
    from loupe.tracing.otlp import HttpExporter

    return HttpExporter(endpoint=settings.endpoint)


def server_resource() -> dict[str, object]:
    """The resource of a server's spans and metrics: OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES, service.name "loupe" by default. Made once, in the main
    process, so that the service.instance.id the SDK draws for each process is the same
    whichever exporter sends, and after one is started again."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    return dict(Resource.create({} if named else {SERVICE_NAME: "loupe"}).attributes)


def check_endpoint(protocol: str, endpoint: str, what: str = "spans", setting: str = "--otlp-endpoint") -> None:
    """Say where `what` goes, and whether anything listens there now (a refused or unanswered
    connection is the usual reason for a trace that never appears)."""
    if protocol == "file":
        from loupe.tracing.file_export import file_path

        logger.info("writing %s as OTLP JSON lines to %s", what, os.path.abspath(file_path(endpoint)))
        return
    logger.info("exporting %s over OTLP %s to %s", what, protocol, endpoint)
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=ENDPOINT_CHECK_S).close()
    except OSError as e:
        logger.warning("nothing answers at %s:%d (%s): %s will fail to export until the OTLP backend "
                       "is up (check %s)", url.hostname, port, e.strerror or e, what, setting)


def stop_on_sigterm(stop) -> tuple[socket.socket, socket.socket]:
    """Call `stop()` on SIGTERM, and make the first socket returned readable, so that a poll
    on it ends at once (the second is the signal's end: keep it open)."""
    signal.signal(signal.SIGTERM, lambda *_: stop())
    signals, wake = socket.socketpair()
    wake.setblocking(False)
    signal.set_wakeup_fd(wake.fileno())
    return signals, wake


class ExporterProcess:
    def __init__(self, settings: ExportSettings, endpoints: ipc.Endpoints, resource: dict | None = None):
        from opentelemetry.sdk.trace.export import SpanExportResult

        from loupe.tracing.otlp import SpanEncoder

        self.settings = settings
        self.success = SpanExportResult.SUCCESS
        self.exporter = make_exporter(settings)
        self.encoder = SpanEncoder(resource if resource is not None else server_resource())
        ctx = zmq.Context()
        self.inbox = ipc.bind(ctx, zmq.PULL, endpoints.tracing)
        self.to_manager = ipc.connect(ctx, zmq.PUSH, endpoints.manager)
        self.queue: deque = deque()  # spans as SpanEncoder takes them
        # A full batch waits for the next round instead of leaving at once: calls made back
        # to back cost ~40% less CPU at each end than the same calls spread out (BENCHMARKS.md).
        self.export_early_at = max(settings.max_export_batch_size, settings.max_queue_size // 2)
        self.wakeup = threading.Event()
        self.stopping = False
        self.drained = False  # set once nothing more will be received: the export thread may end
        self.tail = TailKeeper(max_held=settings.max_queue_size // 2)
        self.exported = self.dropped = self.failed = 0
        self.warned_dropped, self.last_warning = 0, 0.0

    def run_forever(self) -> None:
        """The exporter process: at the lowest CPU priority, receive and report until SIGTERM.
        A signal ends a wait at once (through the signal wake-up fd), so the loop wakes only
        for spans, the stats and signals."""
        yield_to_serving()
        check_endpoint(self.settings.protocol, self.settings.endpoint)
        signals, _wake = stop_on_sigterm(self.stop)  # both stay open while it runs
        worker = threading.Thread(target=self.export_loop, name="otlp-export", daemon=True)
        worker.start()
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(signals, zmq.POLLIN)
        last_stats, reported = 0.0, None
        while not self.stopping:
            ready = dict(poller.poll(max(0.0, last_stats + STATS_EVERY_S - time.monotonic()) * 1000))
            if signals in ready:
                signals.recv(64)
            if self.inbox in ready:
                self.receive_all()
            now = time.monotonic()
            if now - last_stats >= STATS_EVERY_S:
                self.tail.expire(now)
                stats = self.stats()
                if stats != reported:
                    ipc.send(self.to_manager, stats)
                    reported = stats
                last_stats = now
                self.warn_about_drops(now)
        self.drain()  # what the serving processes flushed while stopping
        self.drained = True
        self.wakeup.set()
        worker.join(SHUTDOWN_EXPORT_S)
        self.exporter.shutdown()
        ipc.send(self.to_manager, self.stats())

    def stop(self) -> None:
        self.stopping = True

    def stats(self) -> ipc.ExporterStats:
        return ipc.ExporterStats(self.exported, self.dropped, self.failed, dict(self.tail.kept),
                                 dict(self.tail.discarded), os.getpid(), len(self.queue) + self.tail.num_held)

    def drain(self, quiet_s: float = DRAIN_QUIET_S, limit_s: float = 1.0) -> None:
        """Receive until nothing has come for `quiet_s` (`limit_s` at most). The main process
        flushes its last spans just before it stops this one, and they may still be in transit
        when the signal lands."""
        deadline = time.monotonic() + limit_s
        while self.inbox.poll(quiet_s * 1000) and time.monotonic() < deadline:
            self.receive_all()

    def receive_all(self) -> None:
        while True:
            try:
                batch = ipc.recv(self.inbox, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.add(batch)

    def add(self, batch: ipc.SpanBatch) -> None:
        """Queue the batch's spans (a fan-out counts one per request), as many as fit; hold
        those of undecided traces until their verdict (tracing/tail.py)."""
        self.dropped += batch.dropped
        offset = batch.offset_ns
        spans = [(record, offset) for record in batch.spans]
        for fanout in batch.fanouts:
            spans.extend((fanout, offset, parent) for parent in fanout.parents)
        if batch.undecided:
            spans, dropped = self.tail.sort(spans, batch.undecided, self.room())
            self.dropped += dropped
            for trace_id, reason in batch.verdicts:
                spans.extend(self.tail.settle(trace_id, reason))
        room = self.room()
        if len(spans) > room:
            self.dropped += len(spans) - room
            del spans[room:]
        self.queue.extend(spans)
        if len(self.queue) >= self.export_early_at:
            self.wakeup.set()

    def room(self) -> int:
        return max(0, self.settings.max_queue_size - len(self.queue) - self.tail.num_held)

    def export_loop(self) -> None:
        """Every `schedule_delay` (sooner when the queue is half full, or when stopping), send
        what is queued, back to back, in exports of at most `max_export_batch_size` spans; at
        shutdown, until the last batches received are sent (not merely until the queue is empty
        once: more may still be on the way)."""
        delay = self.settings.schedule_delay_ms / 1000
        size = self.settings.max_export_batch_size
        while True:
            self.wakeup.wait(delay)
            self.wakeup.clear()
            for _ in range(-(-len(self.queue) // size)):  # spans queued meanwhile wait for the next round
                self.export([self.queue.popleft() for _ in range(min(size, len(self.queue)))])
            if self.drained and not self.queue:
                return

    def export(self, batch: list) -> None:
        """Encode and send one batch of queued spans, counting them exported or failed."""
        try:
            ok = self.exporter.export(self.encoder.encode(batch)) == self.success
        except Exception:  # an encoding or exporter bug must not stop the exporting
            logger.exception("exporting spans failed")
            ok = False
        if ok:
            self.exported += len(batch)
        else:
            self.failed += len(batch)

    def warn_about_drops(self, now: float) -> None:
        if self.dropped > self.warned_dropped and now - self.last_warning >= WARN_EVERY_S:
            given_up = self.tail.discarded["no_room"]
            held = (f"; {given_up} traces held for the keep rules did not fit: raise OTEL_BSP_MAX_QUEUE_SIZE"
                    if given_up else "")
            logger.warning("dropped %d spans so far (queue of %d full: is the OTLP backend at %s slow or down?%s)",
                           self.dropped, self.settings.max_queue_size, self.settings.endpoint, held)
            self.warned_dropped, self.last_warning = self.dropped, now
