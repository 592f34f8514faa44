"""Logs and metrics joined to traces: --log-requests lines and /metrics exemplars carry the
trace id of the response's traceparent; the per-stage histograms count every finished request."""

import re
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import LiveServer, read_metrics
from loupe import ipc
from loupe.core import FinishReason, TraceContext
from loupe.detokenizer import DetokenizerProcess
from loupe.server.metrics import Metrics
from loupe.tracing.recorder import Recorder
from loupe.tracing.spans import DetokenizerTracer

pytestmark = pytest.mark.slow  # it starts servers

LATENCIES = ("e2e_ms", "ttft_ms", "queue_ms", "prefill_ms", "decode_ms", "detokenize_ms")
LATENCY_HISTOGRAMS = ("loupe_time_to_first_token_seconds", "loupe_e2e_request_latency_seconds",
                      "loupe_queue_time_seconds", "loupe_prefill_time_seconds", "loupe_decode_time_seconds",
                      "loupe_detokenize_time_seconds")
OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}


@pytest.fixture(scope="module")
def server(server_logs, tiny_flags, receiver):
    """Traced (every request, by default) and logging each request."""
    with LiveServer(*tiny_flags, "--enable-tracing", "--otlp-endpoint", f"127.0.0.1:{receiver.port}",
                    "--log-requests", log_dir=server_logs) as live:
        yield live


def complete(server: LiveServer, **body) -> httpx.Response:
    payload = {"model": served_name(server), "prompt": "The capital of France is", "max_tokens": 6,
               "temperature": 0, "ignore_eos": True, **body}
    r = httpx.post(server.url("/v1/completions"), json=payload, timeout=60, trust_env=False)
    assert r.status_code == 200, r.text
    return r


def served_name(server: LiveServer) -> str:
    return httpx.get(server.url("/v1/models"), trust_env=False).json()["data"][0]["id"]


def trace_id(response: httpx.Response) -> str:
    return response.headers["traceparent"].split("-")[1]


def logged(server: LiveServer, rid: str, timeout: float = 10) -> dict[str, str]:
    """The fields of the request's --log-requests line, once it is written."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(rf" request (rid={re.escape(rid)} .*)$", server.log(), re.M)
        if found:
            return dict(field.split("=", 1) for field in found.group(1).split(" "))
        assert time.monotonic() < deadline, f"no log line for {rid}:\n{server.log()}"
        time.sleep(0.05)


def test_a_finished_request_is_logged_with_its_trace_id_counts_and_stage_times(server):
    r = complete(server)
    usage = r.json()["usage"]
    line = logged(server, r.json()["id"])
    assert re.fullmatch("[0-9a-f]{32}", line["trace_id"]) and line["trace_id"] == trace_id(r)
    assert line["status"] == "length"
    assert int(line["prompt_tokens"]) == usage["prompt_tokens"]
    assert int(line["completion_tokens"]) == usage["completion_tokens"] == 6
    assert int(line["cached_tokens"]) == usage["prompt_tokens_details"]["cached_tokens"]
    for key in LATENCIES:
        assert re.fullmatch(r"\d+\.\d", line[key]), (key, line)
    ms = {key: float(line[key]) for key in LATENCIES}
    assert ms["e2e_ms"] >= ms["ttft_ms"] > 0
    # The scheduler's stages lie within the main process's end to end (each rounded to 0.1 ms).
    assert ms["queue_ms"] + ms["prefill_ms"] + ms["decode_ms"] <= ms["e2e_ms"] + 0.3
    assert ms["detokenize_ms"] > 0


def test_an_untraced_request_is_logged_with_the_trace_id_of_its_traceparent(server):
    r = complete(server, metadata={"trace": "false"})
    assert r.headers["traceparent"].endswith("-00")
    assert logged(server, r.json()["id"])["trace_id"] == trace_id(r)


def test_a_client_that_leaves_is_logged_as_abort(server):
    rid = f"leaves-{uuid.uuid4().hex}"
    body = {"rid": rid, "text": "Once upon a time", "stream": True,
            "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
    with httpx.stream("POST", server.url("/generate"), json=body, timeout=60, trust_env=False) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    line = logged(server, rid)
    assert line["status"] == "abort" and line["trace_id"] == trace_id(r)
    assert int(line["completion_tokens"]) < 1000
    assert line["prefill_ms"] == line["decode_ms"] == line["detokenize_ms"] == "-"
    assert float(line["e2e_ms"]) > 0


def test_openmetrics_scrape_has_exemplars_of_recorded_traces_only(server):
    traced = complete(server)
    untraced = complete(server, metadata={"trace": "false"})  # would replace traced's exemplars if it had one
    r = httpx.get(server.url("/metrics"), headers=OPENMETRICS, timeout=10, trust_env=False)
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    for family in LATENCY_HISTOGRAMS:
        exemplar = rf'^{family}_bucket\{{le="[^"]+"\}} \S+ # \{{trace_id="{trace_id(traced)}"\}} \S+'
        assert re.search(exemplar, r.text, re.M), family
    assert trace_id(untraced) not in r.text
    plain = httpx.get(server.url("/metrics"), timeout=10, trust_env=False)
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "loupe_e2e_request_latency_seconds_bucket" in plain.text and "trace_id" not in plain.text


def test_stage_histograms_count_every_finished_request(server):
    before = read_metrics(server)
    for _ in range(3):
        complete(server)
    after = read_metrics(server)
    for family in LATENCY_HISTOGRAMS:
        count = f"{family}_count"
        assert after[count] - before.get(count, 0) == 3, family
        assert after[f"{family}_sum"] > before.get(f"{family}_sum", 0), family
    finished = after["loupe_e2e_request_latency_seconds_count"]
    for family in ("loupe_prefill_time_seconds", "loupe_decode_time_seconds", "loupe_detokenize_time_seconds"):
        assert after[f"{family}_count"] == finished, family


def genai_samples(server: LiveServer) -> dict[tuple, float]:
    """The gen_ai_server_* samples of /metrics, read with prometheus_client's own parser:
    {(sample name, operation, model, error type, le): value}."""
    text = httpx.get(server.url("/metrics"), timeout=10, trust_env=False).text
    return {(s.name, s.labels["gen_ai_operation_name"], s.labels["gen_ai_request_model"], s.labels.get("error_type", ""),
             s.labels.get("le")): s.value
            for family in text_string_to_metric_families(text) if family.name.startswith("gen_ai_server_")
            for s in family.samples if s.labels["gen_ai_provider_name"] == "loupe"}


def test_genai_server_metrics_count_each_route_with_the_conventions_names_buckets_and_exemplars(server):
    """Two completions and a chat of 6 tokens and a /generate of 4: each in its operation's
    series; their durations the same as loupe's e2e histogram saw, their TTFT too; the time per
    output token after the first from both."""
    model = served_name(server)
    before, loupe_before = genai_samples(server), read_metrics(server)
    complete(server)
    traced = complete(server)  # the series' last: its bucket's exemplar
    chat = httpx.post(server.url("/v1/chat/completions"), json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "ignore_eos": True},
        timeout=60, trust_env=False)
    native = httpx.post(server.url("/generate"), json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 4, "ignore_eos": True}}, timeout=60, trust_env=False)
    assert chat.status_code == native.status_code == 200
    after, loupe_after = genai_samples(server), read_metrics(server)

    def grown(name: str, operation: str, requested: str, le: str | None = None) -> float:
        key = (name, operation, requested, "", le)
        return after[key] - before.get(key, 0.0)

    counts = {op: grown("gen_ai_server_request_duration_seconds_count", op, m)
              for op, m in (("text_completion", model), ("chat", model), ("generate", ""))}
    assert counts == {"text_completion": 2, "chat": 1, "generate": 1}
    for name in ("gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"):
        assert grown(f"{name}_count", "text_completion", model) == 2 and grown(f"{name}_count", "generate", "") == 1
    e2e = sum(grown("gen_ai_server_request_duration_seconds_sum", op, m)
              for op, m in (("text_completion", model), ("chat", model), ("generate", "")))
    ttft = sum(grown("gen_ai_server_time_to_first_token_seconds_sum", op, m)
               for op, m in (("text_completion", model), ("chat", model), ("generate", "")))
    loupe = {name: loupe_after[name] - loupe_before[name] for name in (
        "loupe_e2e_request_latency_seconds_sum", "loupe_time_to_first_token_seconds_sum")}
    assert e2e == pytest.approx(loupe["loupe_e2e_request_latency_seconds_sum"], rel=1e-6)
    assert ttft == pytest.approx(loupe["loupe_time_to_first_token_seconds_sum"], rel=1e-6)
    tpot = sum(grown("gen_ai_server_time_per_output_token_seconds_sum", op, m)
               for op, m in (("text_completion", model), ("chat", model), ("generate", "")))
    assert 0 < tpot < e2e - ttft  # each request's (e2e - ttft) / (tokens - 1), tokens > 2
    le = [key[4] for key in after if key[0] == "gen_ai_server_time_to_first_token_seconds_bucket"
          and key[1] == "chat"]
    assert le == ["0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75", "1.0",
                  "2.5", "5.0", "7.5", "10.0", "+Inf"]
    scrape = httpx.get(server.url("/metrics"), headers=OPENMETRICS, timeout=10, trust_env=False).text
    assert "# UNIT gen_ai_server_request_duration_seconds seconds" in scrape
    exemplar = rf'^gen_ai_server_request_duration_seconds_bucket\{{[^}}]*\}} \S+ # \{{trace_id="{trace_id(traced)}"\}}'
    assert re.search(exemplar, scrape, re.M)


def test_a_failed_request_is_timed_with_its_error_type_and_not_in_ttft():
    metrics = Metrics()
    metrics.observe_genai("text_completion", "m", 1.5, 0.5, 3, "kv_transfer_failed", None)
    metrics.observe_genai("text_completion", "m", 2.0, 0.5, 4, None, {"trace_id": "ab" * 16})
    sample = metrics.registry.get_sample_value
    labels = {"gen_ai_operation_name": "text_completion", "gen_ai_provider_name": "loupe", "gen_ai_request_model": "m"}
    assert sample("gen_ai_server_request_duration_seconds_count", {**labels, "error_type": "kv_transfer_failed"}) == 1
    assert sample("gen_ai_server_request_duration_seconds_sum", {**labels, "error_type": ""}) == 2.0
    assert sample("gen_ai_server_time_to_first_token_seconds_count", labels) == 1
    assert sample("gen_ai_server_time_per_output_token_seconds_sum", labels) == pytest.approx(0.5)  # 1.5 s / 3


def test_the_detokenize_span_reports_the_time_the_last_output_carries(tiny_model_dir, tmp_path):
    endpoints = ipc.Endpoints(str(tmp_path))
    detokenizer = DetokenizerProcess(tiny_model_dir("llama"), False, endpoints)
    recorder = Recorder(endpoints.tracing, DetokenizerTracer.label)
    detokenizer.tracer = DetokenizerTracer(recorder)
    ctx = TraceContext(trace_id=1, root_span_id=2, level=2)
    outputs = [ipc.RequestOutput("r", [5], trace=ctx), ipc.RequestOutput("r", [6]),
               ipc.RequestOutput("r", [7], result=ipc.RequestResult(FinishReason.LENGTH))]
    started = time.perf_counter()
    for out in outputs:
        detokenizer.convert(out)
    elapsed = time.perf_counter() - started
    assert outputs[0].result is None and outputs[1].result is None  # how it ended: on the last output only
    assert 0 < outputs[-1].result.detokenize_seconds < elapsed
    (span,) = [s for s in recorder.spans if s.name == "detokenize"]
    assert span.attributes == {"num_tokens": 3, "busy_seconds": round(outputs[-1].result.detokenize_seconds, 6)}
    recorder.sock.close(0)
