"""Live servers on a tiny model pushing their metrics over OTLP (OTEL_METRICS_EXPORTER=otlp):
over gRPC beside their traces, over HTTP/protobuf in delta without tracing (its exporter killed
and started again), and to a backend that hangs, which costs the requests nothing. (The file
form: test_metrics_export.py.)"""

import os
import re
import signal
import time
from collections import Counter

import httpx
import pytest
from otlp_receivers import GrpcReceiver, HttpReceiver

from harness import LiveServer, read_metrics, running

pytestmark = pytest.mark.slow  # it starts servers

EVERY_200_MS = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "200"}
DURATION = "gen_ai.server.request.duration"


def served_name(server: LiveServer) -> str:
    return httpx.get(server.url("/v1/models"), trust_env=False).json()["data"][0]["id"]


def requests(server: LiveServer) -> list[httpx.Response]:
    """Two completions and a chat."""
    model = served_name(server)
    sent = [httpx.post(server.url("/v1/completions"), json={"model": model, "prompt": "The capital of France is",
                                                              "max_tokens": 4, "ignore_eos": True},
                       timeout=60, trust_env=False) for _ in range(2)]
    sent.append(httpx.post(server.url("/v1/chat/completions"), json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True},
        timeout=60, trust_env=False))
    assert [r.status_code for r in sent] == [200] * 3
    return sent


def latest_counts(points: list[dict]) -> dict[str, int]:
    """Cumulative points: each operation's count in the last export that has it."""
    return {p["attributes"]["gen_ai.operation.name"]: p["count"] for p in points}


def summed_counts(points: list[dict]) -> dict[str, int]:
    """Delta points: each operation's counts over every export."""
    counts = Counter()
    for p in points:
        counts[p["attributes"]["gen_ai.operation.name"]] += p["count"]
    return dict(counts)


@pytest.fixture(scope="module")
def tiny_flags(tiny_model_dir):
    return ["--model-path", tiny_model_dir("llama"), "--max-total-tokens", 4096]


@pytest.fixture(scope="module")
def receivers():
    with GrpcReceiver() as spans, GrpcReceiver(signal="metrics") as grpc, HttpReceiver(signal="metrics") as http, \
            GrpcReceiver(hang_seconds=10, signal="metrics") as hanging:
        yield {"spans": spans, "grpc": grpc, "http": http, "hanging": hanging}


@pytest.fixture(scope="module")
def servers(tiny_flags, server_logs, receivers):
    """grpc: traced, its metrics over gRPC, cumulative; http: untraced, HTTP/protobuf in delta;
    hanging: untraced, to a backend that answers nothing for 10 s."""
    env = {"grpc": {"OTEL_SERVICE_NAME": "llm-test",
                    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"127.0.0.1:{receivers['grpc'].port}"},
           "http": {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receivers['http'].port}",
                    "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"},
           "hanging": {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"127.0.0.1:{receivers['hanging'].port}",
                       "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "60"}}
    traced = ["--enable-tracing", "--otlp-endpoint", f"127.0.0.1:{receivers['spans'].port}"]
    started = {name: LiveServer(*tiny_flags, *(traced if name == "grpc" else []), log_dir=server_logs,
                                env={**EVERY_200_MS, **env[name]}) for name in env}
    with running(*started.values()):
        yield started


def test_grpc_sends_the_genai_metrics_with_the_traces_resource_and_exemplars(servers, receivers):
    server, grpc = servers["grpc"], receivers["grpc"]
    sent = requests(server)
    points = grpc.wait_for_points(DURATION, lambda p: latest_counts(p) == {"text_completion": 2, "chat": 1})
    last = points[-1]
    assert (last["kind"], last["unit"], last["temporality"], last["scope"]) == ("histogram", "s", 2, "loupe")
    assert last["attributes"]["gen_ai.provider.name"] == "loupe"
    assert last["attributes"]["gen_ai.request.model"] == served_name(server)
    root = receivers["spans"].wait_for(lambda s: any(x["name"].startswith("Req ") for x in s))[0]
    assert last["resource"] == root["resource"] and last["resource"]["service.name"] == "llm-test"
    exemplars = {trace for p in points for trace, _ in p["exemplars"]}
    assert exemplars and exemplars <= {r.headers["traceparent"].split("-")[1] for r in sent}
    assert grpc.points("loupe_requests") and not grpc.points("gen_ai_server_request_duration_seconds")
    samples = read_metrics(server)
    assert samples['loupe_metrics_snapshots_total{result="exported"}'] > 0
    assert 'loupe_metrics_snapshots_total{result="failed"}' not in samples


def test_http_in_delta_without_tracing_counts_each_request_once(servers, receivers):
    http = receivers["http"]
    requests(servers["http"])
    points = http.wait_for_points(DURATION, lambda p: summed_counts(p) == {"text_completion": 2, "chat": 1})
    assert {p["temporality"] for p in points} == {1} and set(http.paths) == {"/v1/metrics"}
    time.sleep(0.6)  # more exports, nothing more to count
    assert summed_counts(http.points(DURATION)) == {"text_completion": 2, "chat": 1}


def test_a_killed_metrics_exporter_starts_again_and_counts_nothing_twice(servers, receivers):
    """In delta, the new exporter's first snapshot is where it counts from: what the dead one
    exported is not sent again."""
    server, http = servers["http"], receivers["http"]
    before = Counter(summed_counts(http.points(DURATION)))
    dead = int(re.search(r"\[metrics pid:(\d+)\]", server.log()).group(1))
    os.kill(dead, signal.SIGKILL)
    assert server.wait_log(f"the metrics exporter (pid {dead}) died with exit code -9; starting it again", 10)
    exports = http.export_count()
    deadline = time.monotonic() + 30
    while http.export_count() < exports + 2:  # the new one's first (its gauges) and another
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    requests(server)
    expected = dict(before + Counter({"text_completion": 2, "chat": 1}))
    http.wait_for_points(DURATION, lambda p: summed_counts(p) == expected)
    time.sleep(0.6)
    assert summed_counts(http.points(DURATION)) == expected
    resources = {tuple(sorted(p["resource"].items())) for p in http.points(DURATION)}
    assert len(resources) == 1  # its service.instance.id too: the server's, not the process's
    assert httpx.get(server.url("/health"), timeout=5).status_code == 200


def test_a_hanging_backend_costs_the_requests_nothing(servers):
    server = servers["hanging"]
    took = []
    for _ in range(4):
        start = time.perf_counter()
        requests(server)
        took.append(time.perf_counter() - start)
    assert max(took) < 5  # three requests of four tokens on a tiny model: about half a second
    samples = read_metrics(server)
    assert samples.get('loupe_metrics_snapshots_total{result="dropped"}', 0) > 0
