"""OTLP over gRPC on one HTTP/2 connection, sent and answered on the exporting thread.

grpcio passes every call through its event-engine threads and a completion queue: about
ten thread wake-ups a call. Where the model's threads fill every core (a CPU server), each
wake-up preempts one of them mid-step while the others wait for it, and at level 3 with
the default 64-span exports that cost ~2% of throughput (BENCHMARKS.md). Here a call is a
write and a blocking read on the calling thread. The `h2` library keeps the HTTP/2 state;
this module adds what a unary OTLP Export needs of gRPC: the 5-byte message frame,
metadata headers, `grpc-timeout`, gzip or deflate, TLS (ALPN h2) for https:// endpoints,
the status from the trailers, and retries of transient failures with backoff within the
timeout. Its settings are the OpenTelemetry SDK's environment variables, read as it reads
them.
"""

from __future__ import annotations

import gzip
import logging
import random
import socket
import ssl
import threading
import time
import zlib
from urllib.parse import urlparse

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.util.re import parse_env_headers

from loupe.tracing.settings import first_env, normalize_endpoint, parsed

logger = logging.getLogger(__name__)
EXPORT_PATHS = {"traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"}
OK, UNAVAILABLE = "0", "14"
# CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE, UNAVAILABLE,
# DATA_LOSS: the codes the SDK's gRPC exporter retries.
RETRYABLE = {"1", "4", "8", "10", "11", "14", "15"}
COMPRESSORS = {"gzip": gzip.compress, "deflate": zlib.compress}


class GrpcExporter:
    """Sends ExportTraceServiceRequests (`signal` "traces") or ExportMetricsServiceRequests
    ("metrics") to an OTLP/gRPC endpoint: `host:port`, `http://` or `https://` (TLS)."""

    def __init__(self, endpoint: str, signal: str = "traces") -> None:
        self.signal = signal
        url = urlparse(normalize_endpoint(endpoint, "grpc"))
        self.address = (url.hostname, url.port or 4317)
        self.tls = url.scheme == "https"
        self.timeout = parsed(self.env("TIMEOUT", "10"), float, lambda v: v > 0, self.env_name("TIMEOUT"),
                              "a positive number of seconds")
        compression = (self.env("COMPRESSION") or "none").strip().lower()
        if compression not in (*COMPRESSORS, "none"):
            raise ValueError(f"{self.env_name('COMPRESSION')} must be gzip, deflate or none, got {compression!r}")
        self.compress = COMPRESSORS.get(compression)
        metadata = parse_env_headers(self.env("HEADERS") or "", liberal=True)
        self.headers = [(":method", "POST"), (":scheme", "https" if self.tls else "http"),
                        (":path", EXPORT_PATHS[signal]),
                        (":authority", url.netloc if url.port else f"{url.netloc}:4317"), ("content-type", "application/grpc"),
                        ("te", "trailers"), ("user-agent", "loupe-otlp-exporter"),
                        *([("grpc-encoding", compression)] if self.compress else []),
                        *((key.lower(), value) for key, value in metadata.items())]
        self.sock: socket.socket | None = None
        self.conn: h2.connection.H2Connection | None = None
        self.closing = threading.Event()

    def env_name(self, name: str) -> str:
        return f"OTEL_EXPORTER_OTLP_{self.signal.upper()}_{name}"

    def env(self, name: str, default: str | None = None) -> str | None:
        """`OTEL_EXPORTER_OTLP_{SIGNAL}_{name}`, else `OTEL_EXPORTER_OTLP_{name}`, else `default`."""
        return first_env(self.env_name(name), f"OTEL_EXPORTER_OTLP_{name}", default=default)

    def export(self, request) -> SpanExportResult:
        payload = request.SerializeToString()
        if self.compress:
            payload = self.compress(payload)
        message = (b"\x01" if self.compress else b"\x00") + len(payload).to_bytes(4, "big") + payload
        deadline = time.monotonic() + self.timeout
        backoff = 1.0
        while not self.closing.is_set():
            try:
                status, detail = self.call(message, deadline)
            except (OSError, h2.exceptions.ProtocolError) as e:  # ssl.SSLError is an OSError
                self.close_connection()
                status, detail = UNAVAILABLE, f"{type(e).__name__}: {e}"
            if status == OK:
                return SpanExportResult.SUCCESS
            wait = min(backoff * random.uniform(0.8, 1.2), deadline - time.monotonic())
            if status not in RETRYABLE or wait <= 0:
                logger.warning("exporting %s to %s:%s failed: gRPC status %s %s", self.signal, *self.address, status,
                               detail)
                return SpanExportResult.FAILURE
            self.closing.wait(wait)
            backoff *= 2
        return SpanExportResult.FAILURE

    def call(self, message: bytes, deadline: float) -> tuple[str, str]:
        """One Export: (gRPC status code, message). Raises OSError when the connection fails."""
        if self.conn is None:
            self.connect(deadline)
        conn = self.conn
        stream = conn.get_next_available_stream_id()
        timeout_ms = max(1, int((deadline - time.monotonic()) * 1000))
        conn.send_headers(stream, [*self.headers, ("grpc-timeout", f"{timeout_ms}m")])
        sent, response, ended = 0, {}, False
        while not ended:
            while sent < len(message):  # as much as the peer's flow-control window takes
                size = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size, len(message) - sent)
                if size <= 0:
                    break
                conn.send_data(stream, message[sent:sent + size], end_stream=sent + size == len(message))
                sent += size
            self.sock.sendall(conn.data_to_send())
            for event in self.receive(deadline):
                if getattr(event, "stream_id", stream) != stream:
                    continue
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    response.update(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    raise ConnectionError(f"the backend ended the call ({type(event).__name__})")
        self.sock.sendall(conn.data_to_send())  # window updates, acks
        if b"grpc-status" in response:
            return response[b"grpc-status"].decode(), response.get(b"grpc-message", b"").decode(errors="replace")
        http_status = response.get(b":status", b"?").decode()
        return (UNAVAILABLE if http_status in ("502", "503", "504") else "2"), f"HTTP status {http_status}, no gRPC status"

    def receive(self, deadline: float) -> list:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer within {self.timeout:g} s")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the backend closed the connection")
        return self.conn.receive_data(data)

    def connect(self, deadline: float) -> None:
        sock = socket.create_connection(self.address, timeout=max(0.001, deadline - time.monotonic()))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            context = ssl.create_default_context(cafile=self.env("CERTIFICATE"))
            if self.env("CLIENT_CERTIFICATE"):
                context.load_cert_chain(self.env("CLIENT_CERTIFICATE"), self.env("CLIENT_KEY"))
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock, server_hostname=self.address[0])
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        self.sock, self.conn = sock, conn

    def close_connection(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self.conn = None

    def shutdown(self) -> None:
        self.closing.set()
        self.close_connection()
