"""Logs and metrics joined to traces: --log-requests lines and /metrics exemplars carry the
trace id of the response's traceparent; the per-stage histograms count every finished request."""

import re
import time
import uuid

import httpx
import pytest

from harness import LiveServer, read_metrics
from loupe import ipc
from loupe.core import FinishReason, TraceContext
from loupe.detokenizer import DetokenizerProcess
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
