"""Real OTLP trace and metrics receivers on loopback, for tests: gRPC and HTTP/protobuf; and
a reader of OTLP JSON lines."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.json_format import Parse
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from loupe.tracing.file_export import ID_FIELDS, with_ids

# signal -> (the request and answer of its Export, how a gRPC servicer of it is added to a server)
SERVICES = {
    "traces": (trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse,
               trace_service_pb2_grpc.add_TraceServiceServicer_to_server),
    "metrics": (metrics_service_pb2.ExportMetricsServiceRequest, metrics_service_pb2.ExportMetricsServiceResponse,
                metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server),
}


def parse_json_line(line: str, signal: str = "traces"):
    """One OTLP JSON line back into its request: protobuf's JSON parser, after turning
    OTLP/JSON's hex ids into the base64 protobuf's mapping takes."""
    message = json.loads(line)
    for item in with_ids(message):
        for key in item.keys() & ID_FIELDS:
            item[key] = base64.b64encode(bytes.fromhex(item[key])).decode()
    return Parse(json.dumps(message), SERVICES[signal][0]())


def flatten(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [flatten(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(pairs) -> dict:
    return {a.key: flatten(a.value) for a in pairs}


def poll(read, predicate, timeout: float) -> tuple:
    """`read()` every 0.1 s until `predicate` holds of it, for up to `timeout` s: the last read,
    and whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if predicate(value):
            return value, True
        if time.monotonic() >= deadline:
            return value, False
        time.sleep(0.1)


class Receiver:
    """Collects every export it is sent, of spans or of metrics (`signal`); `hang_seconds`
    makes each export wait first. As a context manager, stopped on leaving."""

    def __init__(self, hang_seconds: float = 0.0, signal: str = "traces"):
        self.requests: list = []
        self.hang_seconds = hang_seconds
        self.lock = threading.Lock()
        self.request_type, self.response_type, self.add_servicer = SERVICES[signal]

    def record(self, request) -> None:
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        with self.lock:
            self.requests.append(request)

    def received(self) -> list:
        """The export requests so far (a copy: the server's threads keep adding)."""
        with self.lock:
            return list(self.requests)

    def spans(self) -> list[dict]:
        out = []
        for request in self.received():
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append({
                            "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex() or None, "kind": s.kind,
                            "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                            "attributes": attributes(s.attributes),
                            "events": [{"name": e.name, "time": e.time_unix_nano, "attributes": attributes(e.attributes)}
                                       for e in s.events],
                            "status": s.status.code, "status_message": s.status.message,
                            "resource": resource, "trace_state": s.trace_state,
                        })
        return out

    def wait_for(self, predicate, timeout: float = 20.0) -> list[dict]:
        spans, held = poll(self.spans, predicate, timeout)
        if held:
            return spans
        names = Counter(f"{s['name']} (trace {s['trace_id'][:8]})" for s in spans)
        raise AssertionError(f"spans never satisfied the condition; got {len(spans)} spans: {dict(names)}")

    def points(self, name: str) -> list[dict]:
        """The data points of metric `name` in every export, in the order they came."""
        out = []
        for request in self.received():
            for rm in request.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name != name:
                            continue
                        data = getattr(m, m.WhichOneof("data"))
                        for p in data.data_points:
                            point = {"kind": m.WhichOneof("data"), "unit": m.unit, "resource": resource,
                                     "scope": sm.scope.name, "temporality": getattr(data, "aggregation_temporality", 0),
                                     "attributes": attributes(p.attributes),
                                     "start": p.start_time_unix_nano, "time": p.time_unix_nano}
                            if m.WhichOneof("data") == "histogram":
                                point.update(count=p.count, sum=p.sum, bucket_counts=list(p.bucket_counts),
                                             bounds=list(p.explicit_bounds),
                                             exemplars=[(e.trace_id.hex(), e.as_double) for e in p.exemplars])
                            else:
                                point.update(value=p.as_double, monotonic=getattr(data, "is_monotonic", None))
                            out.append(point)
        return out

    def wait_for_points(self, name: str, predicate, timeout: float = 20.0) -> list[dict]:
        """The points of metric `name` once `predicate(points)` holds."""
        points, held = poll(lambda: self.points(name), predicate, timeout)
        if held:
            return points
        raise AssertionError(f"the points of {name} never satisfied the condition; got {points}")

    def export_count(self) -> int:
        with self.lock:
            return len(self.requests)

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class GrpcReceiver(Receiver):
    """On `port` (0: any free one), plaintext or with TLS server `credentials`."""

    def __init__(self, hang_seconds: float = 0.0, port: int = 0, credentials=None, signal: str = "traces"):
        super().__init__(hang_seconds, signal)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.add_servicer(self, self.server)
        address = f"127.0.0.1:{port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        self.server.start()

    def Export(self, request, context):  # noqa: N802 (the gRPC method name)
        self.record(request)
        return self.response_type()

    def stop(self) -> None:
        self.server.stop(0)


class HttpReceiver(Receiver):
    def __init__(self, hang_seconds: float = 0.0, signal: str = "traces"):
        super().__init__(hang_seconds, signal)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.paths.append(self.path)
                request = receiver.request_type()
                request.ParseFromString(body)
                receiver.record(request)
                payload = receiver.response_type().SerializeToString()
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
