"""Metrics over OTLP: /metrics' registry as OTLP (names, kinds, units, exemplars; cumulative
and delta), the settings, the file form, and the metrics exporter process against real
receivers."""

import json
import multiprocessing as mp
import time

import pytest
import zmq
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from otlp_receivers import GrpcReceiver, HttpReceiver, Receiver, parse_json_line

from loupe import ipc
from loupe.launch_server import metrics_settings
from loupe.process import Ready, run_child
from loupe.server.metrics import GENAI_DURATION_BUCKETS, Metrics, MetricsPusher
from loupe.tracing.file_export import otlp_json
from loupe.tracing.metrics_exporter import MetricsExporterProcess
from loupe.tracing.metrics_otlp import MetricsEncoder
from loupe.tracing.settings import ExportSettings, MetricsSettings, normalize_endpoint

TRACE = "0af7651916cd43dd8448eb211c80319c"
DELTA, CUMULATIVE = 1, 2
ENV = ["OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
       "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL",
       "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "OTEL_METRIC_EXPORT_INTERVAL"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def points(request: ExportMetricsServiceRequest, name: str) -> list[dict]:
    receiver = Receiver(signal="metrics")
    receiver.record(request)
    return receiver.points(name)


# ---- a snapshot as OTLP ---------------------------------------------------------------------------


def test_a_snapshot_goes_out_under_opentelemetry_names_with_kinds_units_and_exemplars():
    m = Metrics()
    m.observe_genai("chat", "tiny", 0.3, 0.1, 5, None, {"trace_id": TRACE})
    m.observe_genai("text_completion", "", 2.0, None, 0, "kv_transfer_failed", None)
    m.requests.labels(status="stop").inc(2)
    m.num_running.set(3)
    request = MetricsEncoder({"service.name": "loupe"}, delta=False).encode(m.snapshot(0))

    chat, failed = sorted(points(request, "gen_ai.server.request.duration"),
                          key=lambda p: p["attributes"]["gen_ai.operation.name"])
    assert chat["attributes"] == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "loupe",
                                  "gen_ai.request.model": "tiny"}  # error.type only on failures
    assert failed["attributes"] == {"gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "loupe",
                                    "error.type": "kv_transfer_failed"}  # no model named: no attribute
    assert (chat["kind"], chat["unit"], chat["temporality"]) == ("histogram", "s", CUMULATIVE)
    assert chat["bounds"] == list(GENAI_DURATION_BUCKETS) and len(chat["bucket_counts"]) == len(GENAI_DURATION_BUCKETS) + 1
    assert chat["count"] == 1 and chat["sum"] == pytest.approx(0.3)
    assert chat["bucket_counts"][GENAI_DURATION_BUCKETS.index(0.32)] == 1 and sum(chat["bucket_counts"]) == 1
    assert failed["bucket_counts"][-1] == 0 and failed["bucket_counts"][GENAI_DURATION_BUCKETS.index(2.56)] == 1
    assert chat["exemplars"] == [(TRACE, 0.3)] and failed["exemplars"] == []
    assert 0 < chat["start"] <= chat["time"] <= time.time_ns()
    (ttft,) = points(request, "gen_ai.server.time_to_first_token")
    (tpot,) = points(request, "gen_ai.server.time_per_output_token")
    assert ttft["count"] == tpot["count"] == 1 and tpot["sum"] == pytest.approx((0.3 - 0.1) / 4)

    (stop,) = points(request, "loupe_requests")  # a counter keeps its name, without Prometheus's _total
    assert (stop["kind"], stop["monotonic"], stop["temporality"], stop["value"]) == ("sum", True, CUMULATIVE, 2)
    assert stop["attributes"] == {"status": "stop"} and 0 < stop["start"] <= stop["time"]
    (running,) = points(request, "loupe_num_running_reqs")
    assert (running["kind"], running["value"]) == ("gauge", 3)
    assert points(request, "loupe_e2e_request_latency_seconds")[0]["unit"] == "s"
    assert points(request, "loupe_prompt_tokens")[0]["unit"] == "{token}"
    assert points(request, "loupe_kv_transfer_bytes")[0]["unit"] == "By"
    assert not points(request, "gen_ai_server_request_duration_seconds") and not points(request, "loupe_requests_total")
    assert (stop["resource"], stop["scope"]) == ({"service.name": "loupe"}, "loupe")
    # A labelled family with no series yet sends nothing.
    assert not points(request, "loupe_request_outcomes")


def test_delta_sends_what_changed_since_the_last_export_that_succeeded():
    m = Metrics()
    encoder = MetricsEncoder({}, delta=True)
    m.requests.labels(status="stop").inc(2)
    m.observe_genai("chat", "tiny", 0.3, 0.1, 5, None, {"trace_id": TRACE})
    m.num_running.set(4)
    first = encoder.encode(m.snapshot(0))
    encoder.commit()
    (stop,) = points(first, "loupe_requests")
    assert (stop["value"], stop["temporality"]) == (2, DELTA)
    assert points(first, "gen_ai.server.request.duration")[0]["count"] == 1

    m.requests.labels(status="stop").inc(3)
    m.requests.labels(status="length").inc()
    m.observe_genai("chat", "tiny", 0.05, 0.01, 2, None, None)
    second = encoder.encode(m.snapshot(1))  # and its export fails: no commit
    by_status = {p["attributes"]["status"]: p for p in points(second, "loupe_requests")}
    assert by_status["stop"]["value"] == 3 and by_status["stop"]["start"] == stop["time"]
    length = by_status["length"]  # new since: all of it, from its start
    assert length["value"] == 1 and stop["time"] < length["start"] < length["time"]
    (duration,) = points(second, "gen_ai.server.request.duration")
    assert duration["count"] == 1 and duration["sum"] == pytest.approx(0.05)
    assert duration["bucket_counts"][GENAI_DURATION_BUCKETS.index(0.08)] == 1 and sum(duration["bucket_counts"]) == 1
    assert duration["exemplars"] == []  # the 0.3 s request's belongs to the first export
    assert points(second, "loupe_num_running_reqs")[0]["value"] == 4  # a gauge is a gauge

    m.requests.labels(status="stop").inc()
    third = encoder.encode(m.snapshot(2))
    encoder.commit()
    (again,) = [p for p in points(third, "loupe_requests") if p["attributes"]["status"] == "stop"]
    assert again["value"] == 4 and again["start"] == stop["time"]  # the failed export's counts too
    fourth = encoder.encode(m.snapshot(3))
    (quiet,) = [p for p in points(fourth, "loupe_requests") if p["attributes"]["status"] == "stop"]
    assert quiet["value"] == 0 and quiet["start"] == again["time"]


def test_a_restarted_exporter_in_delta_counts_from_its_first_snapshot():
    """Its predecessor sent (or lost) the counts before: sending them again would count them twice."""
    m = Metrics()
    m.requests.labels(status="stop").inc(5)
    m.num_running.set(1)
    encoder = MetricsEncoder({}, delta=True)
    first = encoder.encode(m.snapshot(7))  # the server's eighth
    assert points(first, "loupe_requests") == [] and points(first, "loupe_num_running_reqs")[0]["value"] == 1
    m.requests.labels(status="stop").inc()
    assert points(encoder.encode(m.snapshot(8)), "loupe_requests")[0]["value"] == 1


def test_a_file_line_is_otlp_json_with_hex_trace_ids_and_parses_back():
    m = Metrics()
    m.observe_genai("chat", "tiny", 0.3, 0.1, 5, None, {"trace_id": TRACE})
    sent = MetricsEncoder({"service.name": "loupe"}, delta=False).encode(m.snapshot(0))
    raw = json.loads(otlp_json(sent))
    metrics = {metric["name"]: metric for metric in raw["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]}
    histogram = metrics["gen_ai.server.request.duration"]["histogram"]
    assert histogram["aggregationTemporality"] == CUMULATIVE  # enums as integers
    (point,) = histogram["dataPoints"]
    assert point["exemplars"][0]["traceId"] == TRACE and point["count"] == "1"  # 64-bit integers as strings
    assert parse_json_line(otlp_json(sent), "metrics") == sent


# ---- settings ---------------------------------------------------------------------------------------


def test_off_unless_otel_metrics_exporter_says_otlp(monkeypatch):
    assert MetricsSettings.from_env() is None
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    assert MetricsSettings.from_env(SPANS_GRPC) is None
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    assert MetricsSettings.from_env() == MetricsSettings("http://localhost:4317", "grpc", 60_000, False)


SPANS_GRPC = ExportSettings("http://collector:4317", "grpc", 500, 64, 2048)
SPANS_HTTP = ExportSettings("http://collector:4318/v1/traces", "http/protobuf", 500, 64, 2048)


@pytest.mark.parametrize("env, spans, expected", [
    ({}, SPANS_GRPC, ("grpc", "http://collector:4317")),  # where the spans go
    ({}, SPANS_HTTP, ("http/protobuf", "http://collector:4318/v1/metrics")),  # and how
    ({}, ExportSettings("file:///tmp/t.jsonl", "file", 500, 64, 2048), ("grpc", "http://localhost:4317")),  # not there
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4317"}, SPANS_GRPC, ("grpc", "http://base:4317")),
    ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "m:4317", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4317"}, None,
     ("grpc", "http://m:4317")),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, None, ("http/protobuf", "http://localhost:4318/v1/metrics")),
    ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318/otlp"},
     None, ("http/protobuf", "http://base:4318/otlp/v1/metrics")),
    ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m/custom"},
     None, ("http/protobuf", "http://m/custom")),  # a signal's own endpoint is taken as it is
    ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "m:4318"},
     None, ("http/protobuf", "http://m:4318/v1/metrics")),  # ... unless it has no path
])
def test_where_metrics_go(monkeypatch, env, spans, expected):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = MetricsSettings.from_env(spans)
    assert (settings.protocol, settings.endpoint) == expected


def test_temporality_interval_and_file(monkeypatch, tmp_path):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "OTLP")
    for preference, delta in (("delta", True), ("LowMemory", True), ("cumulative", False)):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", preference)
        assert MetricsSettings.from_env().delta is delta
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "250")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"file://{tmp_path}/m.jsonl")
    settings = MetricsSettings.from_env()
    assert (settings.interval_ms, settings.protocol, settings.endpoint) == (250, "file", f"file://{tmp_path}/m.jsonl")


@pytest.mark.parametrize("env", [
    {"OTEL_METRICS_EXPORTER": "prometheus"},
    {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "sometimes"},
    {"OTEL_METRIC_EXPORT_INTERVAL": "0"},
    {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "carrier-pigeon"},
    {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "file:///no/such/folder/m.jsonl"},
    {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://:4317"},
])
def test_a_bad_setting_refuses_to_start_with_one_line_naming_it(monkeypatch, env):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (name,) = env
    with pytest.raises(SystemExit, match=f"^loupe: {name} ") as refused:
        metrics_settings(None)
    assert "\n" not in str(refused.value)


# ---- the exporter process -----------------------------------------------------------------------------


class MetricsExporter:
    """A metrics exporter process, a pusher of `metrics` that feeds it every `interval` seconds,
    and the reports it sends back."""

    def __init__(self, endpoint: str, protocol: str = "grpc", interval: float = 0.1):
        self.endpoints = ipc.Endpoints.create(dp_size=1)
        self.reports = ipc.bind(zmq.Context.instance(), zmq.PULL, self.endpoints.manager)
        ctx = mp.get_context("spawn")
        read, write = ctx.Pipe(duplex=False)
        settings = MetricsSettings(endpoint, protocol, round(interval * 1000), False)
        self.proc = ctx.Process(target=run_child, args=("metrics", "info", write, MetricsExporterProcess, settings,
                                                         self.endpoints), daemon=True)
        self.proc.start()
        got = read.recv()
        assert isinstance(got, Ready) and got.info is None  # ready, with no info to give
        self.metrics = Metrics()
        self.pusher = MetricsPusher(self.metrics, self.endpoints.metrics, interval)

    def reported(self) -> list[ipc.MetricsExported]:
        out = []
        while self.reports.poll(0):
            out.append(ipc.recv(self.reports))
        return out

    def stop(self) -> None:
        self.pusher.close()
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(15)
        assert self.proc.exitcode is not None


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_the_exporter_sends_each_snapshot_and_reports_it(protocol):
    with (GrpcReceiver(signal="metrics") if protocol == "grpc" else HttpReceiver(signal="metrics")) as receiver:
        endpoint = normalize_endpoint(f"127.0.0.1:{receiver.port}", protocol, "/v1/metrics")
        exporter = MetricsExporter(endpoint, protocol)
        try:
            exporter.metrics.observe_genai("chat", "tiny", 0.3, 0.1, 5, None, {"trace_id": TRACE})
            receiver.wait_for_points("gen_ai.server.request.duration", lambda p: p and p[-1]["count"] == 1)
            exporter.metrics.observe_genai("chat", "tiny", 0.2, 0.1, 5, None, None)
            last = receiver.wait_for_points("gen_ai.server.request.duration", lambda p: p and p[-1]["count"] == 2)[-1]
            assert last["exemplars"] == [(TRACE, 0.3)] and last["resource"]["service.name"] == "loupe"
            reports = exporter.reported()
            assert reports and all(r.ok for r in reports)
        finally:
            exporter.stop()
        if protocol == "http/protobuf":
            assert set(receiver.paths) == {"/v1/metrics"}


def test_a_file_endpoint_gets_a_line_per_snapshot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    exporter = MetricsExporter(f"file://{path}", "file")
    try:
        exporter.metrics.observe_genai("chat", "tiny", 0.3, 0.1, 5, None, {"trace_id": TRACE})
        deadline = time.monotonic() + 10
        while len(path.read_text().splitlines()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        exporter.stop()
    receiver = Receiver(signal="metrics")
    for line in path.read_text().splitlines():
        receiver.record(parse_json_line(line, "metrics"))
    durations = receiver.points("gen_ai.server.request.duration")
    assert len(durations) >= 2 and {p["count"] for p in durations} == {1}
    assert durations[-1]["exemplars"] == [(TRACE, 0.3)] and durations[-1]["resource"]["service.name"] == "loupe"


def test_the_last_snapshot_is_exported_at_shutdown():
    with GrpcReceiver(signal="metrics") as receiver:
        exporter = MetricsExporter(f"http://127.0.0.1:{receiver.port}", interval=60)
        exporter.metrics.requests.labels(status="stop").inc(3)
        time.sleep(0.5)
        assert receiver.export_count() == 0  # nothing is due for a minute
        exporter.stop()  # as the server stops: a last snapshot, then SIGTERM
        assert [p["value"] for p in receiver.points("loupe_requests")] == [3]


def test_a_hanging_backend_never_makes_the_pusher_wait():
    with GrpcReceiver(hang_seconds=1.5, signal="metrics") as receiver:
        exporter = MetricsExporter(f"http://127.0.0.1:{receiver.port}", interval=60)
        try:
            worst = 0.0
            for _ in range(20):
                start = time.perf_counter()
                exporter.pusher.push()  # as its thread does, which sleeps for a minute here
                worst = max(worst, time.perf_counter() - start)
                time.sleep(0.02)
            assert worst < 0.05
            dropped = exporter.metrics.registry.get_sample_value("loupe_metrics_snapshots_total", {"result": "dropped"})
            assert dropped is not None and dropped >= 5  # one in export, a few waiting in the socket
        finally:
            exporter.stop()
