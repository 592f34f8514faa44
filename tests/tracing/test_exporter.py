"""The exporter process against real OTLP receivers on loopback."""

import multiprocessing as mp
import threading
import time

import pytest
import zmq
from otlp_receivers import GrpcReceiver, HttpReceiver

from loupe import ipc
from loupe.process import Ready, run_child
from loupe.tracing.exporter import ExporterProcess
from loupe.tracing.recorder import SERVER, Fanout, Recorder, SpanRecord
from loupe.tracing.settings import ExportSettings, normalize_endpoint


class Exporter:
    """An exporter process, a recorder that feeds it, and the stats it reports."""

    def __init__(self, endpoint: str, protocol: str = "grpc", delay_ms: int = 50, batch: int = 64, queue: int = 2048):
        self.endpoints = ipc.Endpoints.create(dp_size=1)
        self.stats_sock = ipc.bind(zmq.Context.instance(), zmq.PULL, self.endpoints.manager)
        settings = ExportSettings(endpoint, protocol, delay_ms, batch, queue)
        if protocol == "http/protobuf":
            settings = ExportSettings(normalize_endpoint(endpoint, protocol), protocol, delay_ms, batch, queue)
        ctx = mp.get_context("spawn")
        read, write = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=run_child, args=("exporter", "info", write, ExporterProcess, settings,
                                                         self.endpoints), daemon=True)
        self.proc.start()
        got = read.recv()
        assert isinstance(got, Ready) and got.info is None  # ready, with no info to give
        self.recorder = Recorder(self.endpoints.tracing, "Test")

    def stats(self) -> ipc.ExporterStats | None:
        last = None
        while self.stats_sock.poll(0):
            last = ipc.recv(self.stats_sock)
        return last

    def wait_stats(self, done, timeout: float) -> ipc.ExporterStats | None:
        """The latest stats once `done(stats)` holds, or the last seen when `timeout` runs out."""
        deadline = time.monotonic() + timeout
        stats = None
        while time.monotonic() < deadline and (stats is None or not done(stats)):
            stats = self.stats() or stats
            time.sleep(0.2)
        return stats

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(15)
        assert self.proc.exitcode is not None


def record_request(recorder: Recorder, trace_id: int, n_steps: int = 3) -> None:
    t0 = time.perf_counter_ns()
    recorder.span(SpanRecord(trace_id, 10, None, "Req r1", t0, t0 + 5_000_000,
                             {"rid": "r1", "loupe.request.outcome": "completed"},
                             [("first_token", t0 + 1_000_000, {"n": 1})], kind=SERVER))
    recorder.span(SpanRecord(trace_id, 11, 10, recorder.thread_name, t0 + 100, t0 + 4_000_000,
                             recorder.thread_attributes))
    recorder.span(SpanRecord(trace_id, 12, 11, "decode", t0 + 200, t0 + 3_000_000, error="boom"))
    for i in range(n_steps):
        recorder.fanout("decode_step", t0 + 300 + i, t0 + 400 + i, {"batch_id": i}, [(trace_id, 12, i)])


def record_spans(recorder: Recorder, count: int, first_id: int) -> None:
    """`count` bare spans, sent to the exporter at once."""
    t0 = time.perf_counter_ns()
    for i in range(count):
        recorder.span(SpanRecord(1, first_id + i, None, "s", t0, t0 + 1))
    recorder.flush()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_arrive_with_structure_and_times(protocol):
    receiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    endpoint = f"127.0.0.1:{receiver.port}" if protocol == "grpc" else f"http://127.0.0.1:{receiver.port}"
    exporter = Exporter(endpoint, protocol)
    try:
        before = time.time_ns()
        record_request(exporter.recorder, 0xABCDEF)
        exporter.recorder.flush()
        spans = receiver.wait_for(lambda s: len(s) == 6)
        by_name = {s["name"]: s for s in spans}
        root = by_name["Req r1"]
        assert root["parent_id"] is None and root["kind"] == 2 and root["status"] == 1  # OK
        assert root["attributes"] == {"rid": "r1", "loupe.request.outcome": "completed",
                                      "openinference.span.kind": "LLM"}  # what Phoenix shows as kind
        assert root["trace_id"] == f"{0xABCDEF:032x}"
        assert abs(root["start"] - before) < 2e9 and root["end"] - root["start"] == 5_000_000
        assert root["events"][0]["name"] == "first_token" and root["events"][0]["time"] - root["start"] == 1_000_000
        assert root["resource"]["service.name"] == "loupe"
        thread = by_name[exporter.recorder.thread_name]
        assert thread["parent_id"] == f"{10:016x}" and thread["attributes"]["thread_label"] == "Test"
        assert by_name["decode"]["status"] == 2 and by_name["decode"]["status_message"] == "boom"
        assert thread["status"] == 0 and thread["attributes"]["openinference.span.kind"] == "CHAIN"
        steps = [s for s in spans if s["name"] == "decode_step"]
        assert len(steps) == 3 and {s["parent_id"] for s in steps} == {f"{12:016x}"}
        assert len({s["span_id"] for s in spans}) == 6
        if protocol == "http/protobuf":
            assert set(receiver.paths) == {"/v1/traces"}
    finally:
        exporter.stop()
        receiver.stop()


def test_spans_leave_each_delay_together_in_exports_of_at_most_the_batch_size():
    receiver = GrpcReceiver()
    exporter = Exporter(f"127.0.0.1:{receiver.port}", delay_ms=1000, batch=4)
    try:
        record_spans(exporter.recorder, 10, first_id=100)
        receiver.wait_for(lambda s: len(s) == 10, timeout=5)
        assert sorted(len(r.resource_spans[0].scope_spans[0].spans) for r in receiver.requests) == [2, 4, 4]
    finally:
        exporter.stop()
        receiver.stop()


def test_a_full_batch_waits_for_the_delay_but_a_half_full_queue_leaves_at_once():
    receiver = GrpcReceiver()
    exporter = Exporter(f"127.0.0.1:{receiver.port}", delay_ms=60_000, batch=4, queue=100)
    try:
        record_spans(exporter.recorder, 10, first_id=100)
        time.sleep(1)
        assert receiver.spans() == []  # two full batches, and the delay is a minute
        record_spans(exporter.recorder, 40, first_id=200)  # 50 queued: half of the queue
        receiver.wait_for(lambda s: len(s) == 50, timeout=5)
        assert max(len(r.resource_spans[0].scope_spans[0].spans) for r in receiver.requests) == 4
    finally:
        exporter.stop()
        receiver.stop()


def test_hanging_backend_drops_and_counts_without_blocking():
    receiver = GrpcReceiver(hang_seconds=3)
    exporter = Exporter(f"127.0.0.1:{receiver.port}", delay_ms=10, batch=5, queue=20)
    try:
        worst = 0.0
        for burst in range(20):
            t0 = time.perf_counter_ns()
            for i in range(10):
                exporter.recorder.span(SpanRecord(1, 1000 + burst * 10 + i, None, "s", t0, t0 + 1))
            start = time.perf_counter()
            exporter.recorder.flush()
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.01)
        assert worst < 0.05  # recording never waits for the backend
        stats = exporter.wait_stats(lambda s: s.dropped > 0, timeout=10)
        assert stats is not None and stats.dropped > 0
    finally:
        exporter.stop()
        receiver.stop()


def test_absent_backend_counts_failures(unused_port):
    exporter = Exporter(f"127.0.0.1:{unused_port}", protocol="http/protobuf", delay_ms=10)
    try:
        t0 = time.perf_counter_ns()
        exporter.recorder.span(SpanRecord(1, 2, None, "s", t0, t0 + 1))
        exporter.recorder.flush()
        stats = exporter.wait_stats(lambda s: s.failed > 0, timeout=30)
        assert stats is not None and stats.failed == 1 and stats.exported == 0
    finally:
        exporter.stop()


def test_shutdown_flushes_what_is_queued():
    receiver = GrpcReceiver()
    exporter = Exporter(f"127.0.0.1:{receiver.port}", delay_ms=60_000, batch=1000)
    try:
        record_spans(exporter.recorder, 7, first_id=50)
        stats = exporter.wait_stats(lambda s: s.queued == 7, timeout=5)  # the stats count them waiting
        assert stats is not None and stats.queued == 7 and stats.exported == 0, stats
        assert receiver.spans() == []  # nothing is due for a minute
        exporter.stop()
        assert len(receiver.spans()) == 7
        last = exporter.wait_stats(lambda s: s.exported == 7, timeout=5)  # sent as it exits
        assert last is not None and last.exported == 7 and last.queued == 0, last
    finally:
        receiver.stop()


# ---- encoding: the exporter's own code in this process, against real receivers -------------

OFFSET = 1_700_000_000_000_000_000


@pytest.fixture
def in_process():
    """Factory: (ExporterProcess, receiver) for a protocol, without the process around them."""
    made = []

    def make(protocol: str = "grpc", queue: int = 2048, receiver=None, scheme: str = "http"):
        receiver = receiver or (GrpcReceiver() if protocol == "grpc" else HttpReceiver())
        endpoint = normalize_endpoint(f"{scheme}://127.0.0.1:{receiver.port}", protocol)
        proc = ExporterProcess(ExportSettings(endpoint, protocol, 50, 64, queue), ipc.Endpoints.create(dp_size=1))
        made.append((proc, receiver))
        return proc, receiver

    yield make
    for proc, receiver in made:
        proc.exporter.shutdown()
        proc.inbox.close()
        proc.to_manager.close()
        receiver.stop()


def export_now(proc: ExporterProcess, *spans: tuple, fanouts: tuple = ()) -> None:
    proc.add(ipc.SpanBatch(OFFSET, list(spans), list(fanouts), 0))
    proc.export([proc.queue.popleft() for _ in range(len(proc.queue))])
    assert proc.failed == 0


def span(span_id: int, parent_id: int | None = None, name: str = "s", **fields) -> SpanRecord:
    """A SpanRecord of trace 0xABC, from 100 to 200 ns."""
    return SpanRecord(0xABC, span_id, parent_id, name, 100, 200, **fields)


def value_kinds(receiver) -> dict[str, str]:
    """Attribute key -> the AnyValue field it arrived in (the receiver's dicts lose that)."""
    (request,) = receiver.requests
    return {a.key: a.value.WhichOneof("value") for a in request.resource_spans[0].scope_spans[0].spans[0].attributes}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_attribute_values_arrive_typed(in_process, protocol):
    proc, receiver = in_process(protocol)
    attributes = {"text": "hi", "flag": True, "count": 7, "ratio": 0.25, "reasons": ["stop", "length"],
                  "sizes": (1, 2), "mixed": [True, 1.5], "empty": [], "huge": 2**70}
    export_now(proc, span(1, attributes=attributes))
    (got,) = receiver.wait_for(lambda s: len(s) == 1)
    assert got["attributes"] == {**attributes, "sizes": [1, 2], "huge": str(2**70), "openinference.span.kind": "CHAIN"}
    assert value_kinds(receiver) == {
        "text": "string_value", "flag": "bool_value", "count": "int_value", "ratio": "double_value",
        "reasons": "array_value", "sizes": "array_value", "mixed": "array_value", "empty": "array_value",
        "huge": "string_value", "openinference.span.kind": "string_value"}
    assert type(got["attributes"]["flag"]) is bool and type(got["attributes"]["mixed"][0]) is bool


def test_events_status_kind_parent_tracestate_and_flags(in_process):
    proc, receiver = in_process()
    events = [("first_token", 150, {"completion_tokens": 1}), ("done", 190, None)]
    export_now(proc,
               span(1, 0x99, "Req r1", kind=SERVER, events=events, tracestate="vendor=1,other=x", remote_parent=True,
                    attributes={"loupe.request.outcome": "completed"}),
               span(2, 1, "decode", error="boom"),
               span(3, 2, "odd state", tracestate="Not Valid"),
               span(4, None, "Req cancelled", kind=SERVER, attributes={"loupe.request.outcome": "cancelled"}))
    spans = {s["name"]: s for s in receiver.wait_for(lambda s: len(s) == 4)}
    root, decode, odd = spans["Req r1"], spans["decode"], spans["odd state"]
    assert root["trace_id"] == f"{0xABC:032x}" and root["span_id"] == f"{1:016x}" and root["parent_id"] == f"{0x99:016x}"
    assert (root["start"], root["end"]) == (OFFSET + 100, OFFSET + 200)
    assert root["kind"] == 2 and decode["kind"] == 1  # SERVER, INTERNAL
    assert root["events"] == [{"name": "first_token", "time": OFFSET + 150, "attributes": {"completion_tokens": 1}},
                              {"name": "done", "time": OFFSET + 190, "attributes": {}}]
    assert root["status"] == 1 and (decode["status"], decode["status_message"]) == (2, "boom")  # OK, error
    assert spans["Req cancelled"]["status"] == 0  # unset: not an error, nor a success
    assert root["trace_state"] == "vendor=1,other=x" and decode["trace_state"] == "" and odd["trace_state"] == ""
    assert decode["parent_id"] == f"{1:016x}"
    flags = {s.name: s.flags for s in receiver.requests[0].resource_spans[0].scope_spans[0].spans}
    assert flags == {"Req r1": 0x301, "decode": 0x101, "odd state": 0x101,
                     "Req cancelled": 0x101}  # sampled; parent remote or not
    scope = receiver.requests[0].resource_spans[0].scope_spans[0].scope
    assert scope.name == "loupe"


def test_fanout_gives_each_request_its_own_span(in_process):
    proc, receiver = in_process()
    parents = [(0x100 + i, 0x200 + i, i if i % 2 else None) for i in range(5)]
    export_now(proc, span(1), fanouts=[Fanout("decode_step", 300, 310, {"batch_size": 5}, parents),
                                       Fanout("decode_step", 320, 330, {"batch_size": 5}, parents[:2])])
    steps = [s for s in receiver.wait_for(lambda s: len(s) == 8) if s["name"] == "decode_step"]
    assert [(s["trace_id"], s["parent_id"]) for s in steps] == [
        (f"{t:032x}", f"{p:016x}") for t, p, _ in parents + parents[:2]]
    assert [(s["start"], s["end"]) for s in steps] == [(OFFSET + 300, OFFSET + 310)] * 5 + [(OFFSET + 320, OFFSET + 330)] * 2
    assert [s["attributes"] for s in steps] == [{"batch_size": 5, "openinference.span.kind": "CHAIN", **({"step": step} if step is not None else {})}
                                                for _, _, step in parents + parents[:2]]
    assert all(s["kind"] == 1 and s["events"] == [] for s in steps)
    assert len({s["span_id"] for s in steps}) == 7 and f"{0:016x}" not in {s["span_id"] for s in steps}


def test_resource_names_the_service(in_process, monkeypatch):
    proc, receiver = in_process()
    export_now(proc, span(1))
    (got,) = receiver.wait_for(lambda s: len(s) == 1)
    assert got["resource"]["service.name"] == "loupe" and got["resource"]["telemetry.sdk.language"] == "python"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-llm")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    proc, receiver = in_process()
    export_now(proc, span(1))
    (got,) = receiver.wait_for(lambda s: len(s) == 1)
    assert got["resource"]["service.name"] == "my-llm" and got["resource"]["deployment.environment"] == "test"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    proc, receiver = in_process()
    export_now(proc, span(1))
    (got,) = receiver.wait_for(lambda s: len(s) == 1)
    assert got["resource"]["service.name"] == "from-attributes"


def test_queue_bound_counts_spans_of_fanouts_too(in_process):
    proc, _ = in_process(queue=5)
    proc.add(ipc.SpanBatch(OFFSET, [span(1), span(2)], [Fanout("decode_step", 1, 2, {}, [(1, 2, None)] * 4)], 3))
    assert len(proc.queue) == 5 and proc.dropped == 3 + 1
    proc.add(ipc.SpanBatch(OFFSET, [span(3)], [], 0))
    assert len(proc.queue) == 5 and proc.dropped == 5


class MetadataReceiver(GrpcReceiver):
    """A gRPC receiver that also keeps the metadata (headers) of each export."""

    def __init__(self):
        super().__init__()
        self.metadata: list[dict] = []

    def Export(self, request, context):  # noqa: N802 (the gRPC method name)
        self.metadata.append(dict(context.invocation_metadata()))
        return super().Export(request, context)


def test_sdk_transport_settings_still_apply(in_process, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-api-key=s3cret,x-team=infra")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    proc, receiver = in_process(receiver=MetadataReceiver())
    export_now(proc, span(1))
    receiver.wait_for(lambda s: len(s) == 1)
    assert {"x-api-key": "s3cret", "x-team": "infra"}.items() <= receiver.metadata[0].items()


def test_https_endpoint_means_tls(in_process, monkeypatch):
    """A plaintext receiver behind an https:// endpoint gets nothing: the exporter spoke TLS."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    proc, receiver = in_process(scheme="https")
    proc.add(ipc.SpanBatch(OFFSET, [span(1)], [], 0))
    proc.export(list(proc.queue))
    assert (proc.exported, proc.failed) == (0, 1) and receiver.spans() == []


def test_at_shutdown_the_exporter_sends_batches_still_in_transit(tmp_path):
    """The main process flushes its last spans just before it stops the exporter: a batch that
    lands a little after the signal is still exported, though the export thread found the
    queue empty in between."""
    endpoints = ipc.Endpoints.create(dp_size=1)
    proc = ExporterProcess(ExportSettings(f"file://{tmp_path}/spans.jsonl", "file", 20, 64, 64), endpoints)
    worker = threading.Thread(target=proc.export_loop)
    worker.start()
    proc.stopping = True  # as the signal sets it
    time.sleep(0.05)  # the export thread goes round with nothing queued
    sender = ipc.connect(zmq.Context.instance(), zmq.PUSH, endpoints.tracing)
    late = threading.Timer(0.1, ipc.send, (sender, ipc.SpanBatch(0, [SpanRecord(1, 2, None, "s", 100, 200)], [], 0)))
    late.start()
    started = time.monotonic()
    proc.drain()
    assert time.monotonic() - started < 1.0  # it stops waiting once nothing more comes
    proc.drained = True
    proc.wakeup.set()
    worker.join(5)
    late.join()
    sender.close()
    assert not worker.is_alive() and (proc.exported, proc.failed, len(proc.queue)) == (1, 0, 0)
