"""The metrics exporter process: snapshots of the HTTP process's metrics in, OTLP out.

With OTEL_METRICS_EXPORTER=otlp the HTTP process pushes a snapshot of its Prometheus
registry every OTEL_METRIC_EXPORT_INTERVAL (server/metrics.py `MetricsPusher`). This
process encodes the newest one received (tracing/metrics_otlp.py) and exports it over
gRPC, HTTP or to a file with the span exporter's senders, under the
OTEL_EXPORTER_OTLP_METRICS_* settings. Only this process waits for the backend, up to the
export timeout; meanwhile a few snapshots wait in the socket (`ipc.METRICS_QUEUE`), the HTTP
process drops the rest, and of those waiting only the newest is sent. Each export's result goes back to the HTTP process for
/metrics. It runs at low CPU priority; on SIGTERM it exports the last snapshot, which the
HTTP process pushes as the server stops.
"""

from __future__ import annotations

import logging

import zmq
from opentelemetry.sdk.trace.export import SpanExportResult

from loupe import ipc
from loupe.process import yield_to_serving
from loupe.tracing.exporter import DRAIN_QUIET_S, check_endpoint, make_exporter, server_resource, stop_on_sigterm
from loupe.tracing.metrics_otlp import MetricsEncoder
from loupe.tracing.settings import MetricsSettings

logger = logging.getLogger(__name__)


class MetricsExporterProcess:
    def __init__(self, settings: MetricsSettings, endpoints: ipc.Endpoints, resource: dict | None = None):
        self.settings = settings
        self.exporter = make_exporter(settings, "metrics")
        self.encoder = MetricsEncoder(resource if resource is not None else server_resource(), settings.delta)
        ctx = zmq.Context()
        self.inbox = ipc.bind(ctx, zmq.PULL, endpoints.metrics, queue=ipc.METRICS_QUEUE)
        self.to_manager = ipc.connect(ctx, zmq.PUSH, endpoints.manager)
        self.stopping = False

    def run_forever(self) -> None:
        """At the lowest CPU priority, export each snapshot as it comes, until SIGTERM."""
        yield_to_serving()
        check_endpoint(self.settings.protocol, self.settings.endpoint, "metrics", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        signals, _wake = stop_on_sigterm(self.stop)  # both stay open while it runs
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(signals, zmq.POLLIN)
        while not self.stopping:
            ready = dict(poller.poll())
            if signals in ready:
                signals.recv(64)
            if self.inbox in ready:
                self.export_newest()
        if self.inbox.poll(DRAIN_QUIET_S * 1000):  # the last snapshot, pushed as the server stopped
            self.export_newest()
        self.exporter.shutdown()

    def stop(self) -> None:
        self.stopping = True

    def export_newest(self) -> None:
        """Export the newest snapshot waiting; older ones are superseded: it holds their totals
        (and in delta, what changed is counted from the last export that succeeded)."""
        snapshots = []
        while True:
            try:
                snapshots.append(ipc.recv(self.inbox, zmq.NOBLOCK))
            except zmq.Again:
                break
        if not snapshots:
            return
        try:
            ok = self.exporter.export(self.encoder.encode(snapshots[-1])) == SpanExportResult.SUCCESS
        except Exception:  # an encoding or exporter bug must not stop the exporting
            logger.exception("exporting metrics failed")
            ok = False
        if ok:
            self.encoder.commit()
        ipc.send(self.to_manager, ipc.MetricsExported(ok, len(snapshots) - 1))
