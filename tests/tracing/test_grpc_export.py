"""loupe's own OTLP/gRPC sender against real grpcio TraceService servers on loopback."""

import subprocess
import time

import grpc
import pytest
from opentelemetry.sdk.trace.export import SpanExportResult
from otlp_receivers import GrpcReceiver

from loupe.tracing.grpc_export import GrpcExporter
from loupe.tracing.otlp import SpanEncoder
from loupe.tracing.recorder import SpanRecord

OFFSET = 1_700_000_000_000_000_000


def request(num_spans: int, name: str = "s"):
    records = [(SpanRecord(7, i + 1, None, name, 10, 20, {"i": i, "pad": "x" * 40}), OFFSET) for i in range(num_spans)]
    return SpanEncoder({"service.name": "loupe"}).encode(records)


class ScriptedReceiver(GrpcReceiver):
    """Answers its first exports with the given gRPC status codes, then accepts."""

    def __init__(self, codes: list, **kwargs):
        super().__init__(**kwargs)
        self.codes = list(codes)
        self.calls = 0

    def Export(self, request, context):  # noqa: N802 (the gRPC method name)
        self.calls += 1
        if self.codes:
            context.abort(self.codes.pop(0), "scripted")
        return super().Export(request, context)


@pytest.fixture
def exporters():
    made = []

    def make(endpoint: str) -> GrpcExporter:
        made.append(GrpcExporter(endpoint))
        return made[-1]

    yield make
    for exporter in made:
        exporter.shutdown()


def test_an_export_larger_than_the_flow_control_window_arrives_whole(exporters):
    receiver = GrpcReceiver()
    try:
        big = request(3000)
        assert big.ByteSize() > 3 * 65535
        assert exporters(f"http://127.0.0.1:{receiver.port}").export(big) == SpanExportResult.SUCCESS
        assert len(receiver.spans()) == 3000
    finally:
        receiver.stop()


def test_many_exports_share_one_connection(exporters):
    receiver = GrpcReceiver()
    try:
        exporter = exporters(f"http://127.0.0.1:{receiver.port}")
        results = [exporter.export(request(5)) for _ in range(50)]
        connection = exporter.sock
        assert results == [SpanExportResult.SUCCESS] * 50 and exporter.sock is connection
        assert receiver.export_count() == 50
    finally:
        receiver.stop()


def test_unavailable_is_retried_and_a_refusal_is_not(exporters, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "10")
    flaky = ScriptedReceiver([grpc.StatusCode.UNAVAILABLE])
    refusing = ScriptedReceiver([grpc.StatusCode.INVALID_ARGUMENT])
    try:
        assert exporters(f"http://127.0.0.1:{flaky.port}").export(request(3)) == SpanExportResult.SUCCESS
        assert flaky.calls == 2 and len(flaky.spans()) == 3
        start = time.monotonic()
        assert exporters(f"http://127.0.0.1:{refusing.port}").export(request(3)) == SpanExportResult.FAILURE
        assert refusing.calls == 1 and time.monotonic() - start < 1
    finally:
        flaky.stop()
        refusing.stop()


def test_gives_up_at_the_timeout_on_an_absent_backend(exporters, monkeypatch, unused_port):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2")
    start = time.monotonic()
    assert exporters(f"http://127.0.0.1:{unused_port}").export(request(1)) == SpanExportResult.FAILURE
    assert 1.5 < time.monotonic() - start < 4


def test_reconnects_after_the_backend_restarts(exporters, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "10")
    first = GrpcReceiver()
    exporter = exporters(f"http://127.0.0.1:{first.port}")
    assert exporter.export(request(2)) == SpanExportResult.SUCCESS
    first.stop()
    second = GrpcReceiver(port=first.port)
    try:
        assert exporter.export(request(2)) == SpanExportResult.SUCCESS
        assert len(second.spans()) == 2
    finally:
        second.stop()


def test_https_speaks_tls_to_a_backend_with_a_trusted_certificate(exporters, monkeypatch, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    receiver = GrpcReceiver(credentials=credentials)
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", str(cert))
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
        assert exporters(f"https://127.0.0.1:{receiver.port}").export(request(4)) == SpanExportResult.SUCCESS
        assert len(receiver.spans()) == 4
    finally:
        receiver.stop()


@pytest.mark.parametrize("name, value", [("COMPRESSION", "brotli"), ("TIMEOUT", "soon"), ("TIMEOUT", "0")])
def test_a_bad_setting_is_refused_by_name(monkeypatch, name, value):
    monkeypatch.setenv(f"OTEL_EXPORTER_OTLP_TRACES_{name}", value)
    with pytest.raises(ValueError, match=f"OTEL_EXPORTER_OTLP_TRACES_{name}"):
        GrpcExporter("http://127.0.0.1:4317")


def test_endpoint_forms_name_the_same_authority():
    assert GrpcExporter("127.0.0.1:4317").address == ("127.0.0.1", 4317)
    assert dict(GrpcExporter("http://[::1]:4317").headers)[":authority"] == "[::1]:4317"
    assert dict(GrpcExporter("https://collector.example.com").headers)[":authority"] == "collector.example.com:4317"
