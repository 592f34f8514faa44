"""Real OTLP trace receivers on loopback, for tests: gRPC and HTTP/protobuf."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def flatten(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [flatten(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Receiver:
    """Collects every span it is sent; `hang_seconds` makes each export wait first. As a
    context manager, stopped on leaving."""

    def __init__(self, hang_seconds: float = 0.0):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.hang_seconds = hang_seconds
        self.lock = threading.Lock()

    def record(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        with self.lock:
            self.requests.append(request)

    def spans(self) -> list[dict]:
        out = []
        with self.lock:
            requests = list(self.requests)
        for request in requests:
            for rs in request.resource_spans:
                resource = {a.key: flatten(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append({
                            "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex() or None, "kind": s.kind,
                            "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                            "attributes": {a.key: flatten(a.value) for a in s.attributes},
                            "events": [{"name": e.name, "time": e.time_unix_nano,
                                        "attributes": {a.key: flatten(a.value) for a in e.attributes}} for e in s.events],
                            "status": s.status.code, "status_message": s.status.message,
                            "resource": resource, "trace_state": s.trace_state,
                        })
        return out

    def wait_for(self, predicate, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans()
            if predicate(spans):
                return spans
            time.sleep(0.1)
        spans = self.spans()
        names = Counter(f"{s['name']} (trace {s['trace_id'][:8]})" for s in spans)
        raise AssertionError(f"spans never satisfied the condition; got {len(spans)} spans: {dict(names)}")

    def export_count(self) -> int:
        with self.lock:
            return len(self.requests)

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class GrpcReceiver(Receiver, trace_service_pb2_grpc.TraceServiceServicer):
    """On `port` (0: any free one), plaintext or with TLS server `credentials`."""

    def __init__(self, hang_seconds: float = 0.0, port: int = 0, credentials=None):
        super().__init__(hang_seconds)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        address = f"127.0.0.1:{port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        self.server.start()

    def Export(self, request, context):  # noqa: N802 (the gRPC method name)
        self.record(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self.server.stop(0)


class HttpReceiver(Receiver):
    def __init__(self, hang_seconds: float = 0.0):
        super().__init__(hang_seconds)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.paths.append(self.path)
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.record(request)
                payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
