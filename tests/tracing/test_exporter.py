"""The exporter process against real OTLP receivers on loopback."""

import multiprocessing as mp
import time

import pytest
import zmq
from otlp_receivers import GrpcReceiver, HttpReceiver

from loupe import ipc
from loupe.tracing.exporter import run_exporter_process
from loupe.tracing.recorder import SERVER, Recorder
from loupe.tracing.settings import ExportSettings


class Exporter:
    """An exporter process, a recorder that feeds it, and the stats it reports."""

    def __init__(self, endpoint: str, protocol: str = "grpc", delay_ms: int = 50, batch: int = 64, queue: int = 2048):
        self.dir = ipc.ipc_dir()
        self.stats_sock = ipc.bind(zmq.Context.instance(), zmq.PULL, ipc.endpoint(self.dir, "manager"))
        settings = ExportSettings(endpoint, protocol, delay_ms, batch, queue)
        if protocol == "http/protobuf":
            from loupe.tracing.settings import normalize_endpoint

            settings = ExportSettings(normalize_endpoint(endpoint, protocol), protocol, delay_ms, batch, queue)
        ctx = mp.get_context("spawn")
        read, write = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=run_exporter_process, args=(settings, self.dir, write), daemon=True)
        self.proc.start()
        assert read.recv() == {}
        self.recorder = Recorder(ipc.endpoint(self.dir, "tracing"), "Test")

    def stats(self) -> ipc.ExporterStats | None:
        last = None
        while self.stats_sock.poll(0):
            last = ipc.recv(self.stats_sock)
        return last

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(15)
        assert self.proc.exitcode is not None


def record_request(recorder: Recorder, trace_id: int, n_steps: int = 3) -> None:
    t0 = time.perf_counter_ns()
    recorder.span(trace_id, 10, None, "Req r1", t0, t0 + 5_000_000, {"rid": "r1"},
                  [("first_token", t0 + 1_000_000, {"n": 1})], kind=SERVER)
    recorder.span(trace_id, 11, 10, recorder.thread_name, t0 + 100, t0 + 4_000_000, recorder.thread_attributes)
    recorder.span(trace_id, 12, 11, "decode", t0 + 200, t0 + 3_000_000, error="boom")
    for i in range(n_steps):
        recorder.fanout("decode_step", t0 + 300 + i, t0 + 400 + i, {"step": i}, [(trace_id, 12)])


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
        assert root["parent_id"] is None and root["kind"] == 2 and root["attributes"] == {"rid": "r1"}
        assert root["trace_id"] == f"{0xABCDEF:032x}"
        assert abs(root["start"] - before) < 2e9 and root["end"] - root["start"] == 5_000_000
        assert root["events"][0]["name"] == "first_token" and root["events"][0]["time"] - root["start"] == 1_000_000
        assert root["resource"]["service.name"] == "loupe"
        thread = by_name[exporter.recorder.thread_name]
        assert thread["parent_id"] == f"{10:016x}" and thread["attributes"]["thread_label"] == "Test"
        assert by_name["decode"]["status"] == 2 and by_name["decode"]["status_message"] == "boom"
        steps = [s for s in spans if s["name"] == "decode_step"]
        assert len(steps) == 3 and {s["parent_id"] for s in steps} == {f"{12:016x}"}
        assert len({s["span_id"] for s in spans}) == 6
        if protocol == "http/protobuf":
            assert set(receiver.paths) == {"/v1/traces"}
    finally:
        exporter.stop()
        receiver.stop()


def test_batch_size_and_delay_take_effect():
    receiver = GrpcReceiver()
    exporter = Exporter(f"127.0.0.1:{receiver.port}", delay_ms=1500, batch=4)
    try:
        t0 = time.perf_counter_ns()
        for i in range(10):
            exporter.recorder.span(1, 100 + i, None, f"s{i}", t0, t0 + 1)
        exporter.recorder.flush()
        receiver.wait_for(lambda s: len(s) >= 8, timeout=5)  # two full batches go at once
        assert all(len(r.resource_spans[0].scope_spans[0].spans) <= 4 for r in receiver.requests)
        time.sleep(0.5)
        assert len(receiver.spans()) == 8  # the last two wait for the 1.5 s delay
        receiver.wait_for(lambda s: len(s) == 10, timeout=5)
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
                exporter.recorder.span(1, 1000 + burst * 10 + i, None, "s", t0, t0 + 1)
            start = time.perf_counter()
            exporter.recorder.flush()
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.01)
        assert worst < 0.05  # recording never waits for the backend
        deadline = time.monotonic() + 10
        stats = None
        while time.monotonic() < deadline and (stats is None or stats.dropped == 0):
            stats = exporter.stats() or stats
            time.sleep(0.2)
        assert stats is not None and stats.dropped > 0
    finally:
        exporter.stop()
        receiver.stop()


def test_absent_backend_counts_failures(unused_port):
    exporter = Exporter(f"127.0.0.1:{unused_port}", protocol="http/protobuf", delay_ms=10)
    try:
        t0 = time.perf_counter_ns()
        exporter.recorder.span(1, 2, None, "s", t0, t0 + 1)
        exporter.recorder.flush()
        deadline = time.monotonic() + 30
        stats = None
        while time.monotonic() < deadline and (stats is None or stats.failed == 0):
            stats = exporter.stats() or stats
            time.sleep(0.2)
        assert stats is not None and stats.failed == 1 and stats.exported == 0
    finally:
        exporter.stop()


def test_shutdown_flushes_what_is_queued():
    receiver = GrpcReceiver()
    exporter = Exporter(f"127.0.0.1:{receiver.port}", delay_ms=60_000, batch=1000)
    try:
        t0 = time.perf_counter_ns()
        for i in range(7):
            exporter.recorder.span(1, 50 + i, None, "s", t0, t0 + 1)
        exporter.recorder.flush()
        time.sleep(0.5)
        assert receiver.spans() == []  # nothing is due for a minute
        exporter.stop()
        assert len(receiver.spans()) == 7
    finally:
        receiver.stop()
