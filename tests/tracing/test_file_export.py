"""Spans to a file: OTLP JSON lines, as the OpenTelemetry Collector's otlpjsonfile receiver reads them."""

import json
import multiprocessing as mp
import time

import pytest
import zmq
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from otlp_receivers import parse_json_line

from loupe import ipc
from loupe.process import Ready, run_child
from loupe.tracing.exporter import ExporterProcess
from loupe.tracing.file_export import FileExporter, otlp_json
from loupe.tracing.otlp import SpanEncoder
from loupe.tracing.recorder import SERVER, Fanout, Recorder, SpanRecord
from loupe.tracing.settings import ExportSettings

T0 = 1_700_000_000_000_000_000


def request(trace_id: int = 0xABC, steps: int = 2) -> ExportTraceServiceRequest:
    """A root, a thread span, a failed stage and a decode-step fan-out, as the exporter encodes them."""
    root = SpanRecord(trace_id, 10, 0x77, "Req r1", 0, 5_000, {"rid": "r1", "gen_ai.latency.e2e": 5e-6,
                                                               "loupe.request.outcome": "completed"},
                      [("first_token", 1_000, {"completion_tokens": 1})], kind=SERVER, remote_parent=True)
    items = [(root, T0), (SpanRecord(trace_id, 11, 10, "Scheduler [TP 0]", 100, 4_000, {"tp_rank": 0}), T0),
             (SpanRecord(trace_id, 12, 11, "decode", 200, 3_000, error="boom"), T0)]
    fanout = Fanout("decode_step", 300, 400, {"batch_size": 2}, [(trace_id, 12, i) for i in range(steps)])
    items += [(fanout, T0, parent) for parent in fanout.parents]
    return SpanEncoder({"service.name": "loupe"}).encode(items)


def test_a_line_is_otlp_json_and_parses_back_into_the_same_request():
    sent = request()
    line = otlp_json(sent)
    assert "\n" not in line
    raw = json.loads(line)
    span = raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == f"{0xABC:032x}" and span["spanId"] == f"{10:016x}" and span["parentSpanId"] == f"{0x77:016x}"
    assert span["kind"] == 2 and span["status"] == {"code": 1}  # enums as integers
    assert span["startTimeUnixNano"] == str(T0) and "start_time_unix_nano" not in span  # lowerCamelCase
    assert raw["resourceSpans"][0]["resource"]["attributes"][0] == {"key": "service.name",
                                                                     "value": {"stringValue": "loupe"}}
    assert parse_json_line(line) == sent


def test_rotation_by_size_keeps_every_line_in_order_and_a_bounded_number_of_files(tmp_path):
    path = tmp_path / "traces.jsonl"
    one_line = len(otlp_json(request())) + 1
    exporter = FileExporter(str(path), max_bytes=3 * one_line, backups=2)
    for i in range(10):
        exporter.export(request(trace_id=i + 1))
    exporter.shutdown()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["traces.2.jsonl", "traces.3.jsonl", "traces.jsonl"]  # traces.1 was the oldest: deleted
    ids = []
    for name in ("traces.2.jsonl", "traces.3.jsonl", "traces.jsonl"):
        lines = (tmp_path / name).read_text().splitlines()
        assert len(lines) <= 3
        ids += [parse_json_line(line).resource_spans[0].scope_spans[0].spans[0].trace_id for line in lines]
    assert [int.from_bytes(t, "big") for t in ids] == list(range(4, 11))

    again = FileExporter(str(path), max_bytes=one_line, backups=5)  # a restarted exporter numbers on
    again.export(request())
    again.export(request())
    again.shutdown()
    assert (tmp_path / "traces.4.jsonl").exists()


def test_a_file_endpoint_chooses_the_file_sink_and_bad_paths_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")  # the scheme wins
    monkeypatch.setenv("LOUPE_OTLP_FILE_MAX_MB", "5")
    s = ExportSettings.from_env(f"file://{tmp_path}/t.jsonl")
    assert (s.protocol, s.endpoint, s.file_max_bytes, s.file_backups) == ("file", f"file://{tmp_path}/t.jsonl",
                                                                           5 * 2**20, 10)
    with pytest.raises(ValueError, match="--otlp-endpoint .* not a folder that exists"):
        ExportSettings.from_env(f"file://{tmp_path}/missing/t.jsonl")
    with pytest.raises(ValueError, match="must name a file"):
        ExportSettings.from_env(f"file://{tmp_path}/")
    monkeypatch.setenv("LOUPE_OTLP_FILE_BACKUPS", "-1")
    with pytest.raises(ValueError, match="LOUPE_OTLP_FILE_BACKUPS"):
        ExportSettings.from_env(f"file://{tmp_path}/t.jsonl")


def test_the_exporter_process_writes_everything_queued_before_it_exits(tmp_path):
    """With a minute's delay nothing is due; SIGTERM must still leave every span in the file."""
    path = tmp_path / "traces.jsonl"
    endpoints = ipc.Endpoints.create(dp_size=1)
    stats = ipc.bind(zmq.Context.instance(), zmq.PULL, endpoints.manager)
    settings = ExportSettings(f"file://{path}", "file", 60_000, 8, 2048)
    ctx = mp.get_context("spawn")
    read, write = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_child, args=("exporter", "info", write, ExporterProcess, settings, endpoints),
                       daemon=True)
    proc.start()
    try:
        got = read.recv()
        assert isinstance(got, Ready) and got.info is None  # ready, with no info to give
        recorder = Recorder(endpoints.tracing, "Test")
        t0 = time.perf_counter_ns()
        for i in range(20):
            recorder.span(SpanRecord(5, 100 + i, None, f"s{i}", t0, t0 + 1000))
        recorder.flush()
        time.sleep(1)
        assert path.read_text() == ""
        proc.terminate()
        proc.join(15)
        assert proc.exitcode is not None
    finally:
        if proc.is_alive():
            proc.kill()
        stats.close(0)
    lines = path.read_text().splitlines()
    assert len(lines) == 3  # exports of at most 8 spans
    names = [s.name for line in lines for s in parse_json_line(line).resource_spans[0].scope_spans[0].spans]
    assert sorted(names) == sorted(f"s{i}" for i in range(20))
