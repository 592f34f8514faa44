"""A live traced server on a tiny model, exporting to real OTLP receivers on loopback."""

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest
from otlp_receivers import GrpcReceiver, HttpReceiver

from harness import LiveServer, run_server, running, wait_metrics

pytestmark = pytest.mark.slow  # it starts servers

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
MAJOR = {"tokenize", "dispatch", "queue", "prefill", "decode", "detokenize"}


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return str(tmp_path_factory.mktemp("traced-server-logs"))


def traced_server(model: str, logs: str, endpoint: str, *flags, env: dict | None = None) -> LiveServer:
    """A server on `model` exporting its spans to `endpoint` (not started)."""
    return LiveServer("--model-path", model, "--enable-tracing", "--otlp-endpoint", endpoint,
                      "--chunked-prefill-size", 8, *flags, log_dir=logs, env=env)


@pytest.fixture(scope="module")
def traced(tiny_model_dir, logs, receiver):
    """level -> server: one per trace level, all exporting to `receiver`."""
    fast = {"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "50"}
    servers = {level: traced_server(tiny_model_dir("llama"), logs, f"127.0.0.1:{receiver.port}", "--trace-level",
                                    level, *(["--trace-include-content"] if level == 1 else []), env=fast)
               for level in (1, 2, 3)}
    servers["some modules"] = traced_server(tiny_model_dir("llama"), logs, f"127.0.0.1:{receiver.port}",
                                            "--trace-modules", "request,detokenizer", env=fast)
    with running(*servers.values()):
        yield servers


def complete(server: LiveServer, headers: dict | None = None, **body) -> httpx.Response:
    payload = {"model": model_name(server), "prompt": "The capital of France is Paris. Hello, my name is",
               "max_tokens": 6, "temperature": 0, "ignore_eos": True, **body}
    return httpx.post(server.url("/v1/completions"), json=payload, headers=headers or {}, timeout=60)


def model_name(server: LiveServer) -> str:
    return httpx.get(server.url("/v1/models")).json()["data"][0]["id"]


def trace_of(receiver, response: httpx.Response, expected: int | None = None, timeout: float = 20) -> list[dict]:
    trace_id = response.headers["traceparent"].split("-")[1]
    done = (lambda s: len(s) >= expected) if expected else (lambda s: any(x["name"].startswith("Req ") for x in s))
    receiver.wait_for(lambda s: done([x for x in s if x["trace_id"] == trace_id]), timeout)
    time.sleep(0.3)  # let stragglers of the same trace land
    return [s for s in receiver.spans() if s["trace_id"] == trace_id]


def names(spans):
    return sorted(s["name"].split(" (")[0] for s in spans)


def test_level_1_is_the_root_alone_with_content_when_asked(traced, receiver):
    r = complete(traced[1])
    spans = trace_of(receiver, r)
    time.sleep(1)
    spans = [s for s in receiver.spans() if s["trace_id"] == spans[0]["trace_id"]]
    assert len(spans) == 1
    root = spans[0]
    assert root["name"].startswith("Req cmpl-") and root["kind"] == 2
    assert root["attributes"]["gen_ai.usage.completion_tokens"] == 6
    assert {e["name"] for e in root["events"]} >= {"queue.admitted", "prefix_cache.miss", "first_token"}
    assert root["attributes"]["gen_ai.prompt"] == "The capital of France is Paris. Hello, my name is"
    assert root["attributes"]["gen_ai.completion"] == r.json()["choices"][0]["text"]
    a = root["attributes"]
    assert (a["input.value"], a["output.value"]) == (a["gen_ai.prompt"], a["gen_ai.completion"])
    assert (a["input.mime_type"], a["output.mime_type"], a["gen_ai.request.stream"]) == ("text/plain", "text/plain",
                                                                                          False)
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": a["gen_ai.prompt"]}]}]
    (message,) = json.loads(a["gen_ai.output.messages"])
    assert message == {"role": "assistant", "parts": [{"type": "text", "content": a["gen_ai.completion"]}],
                       "finish_reason": "length"}


def test_trace_modules_pick_which_processes_record(traced, receiver):
    """Level 3 with only the HTTP process's and the detokenizer's own spans: the root, the
    tokenizer's thread with tokenize and dispatch, the detokenizer's; nothing of the scheduler."""
    r = complete(traced["some modules"])
    spans = trace_of(receiver, r, expected=6)
    time.sleep(0.5)  # anything else of the trace would have come by now
    spans = [s for s in receiver.spans() if s["trace_id"] == spans[0]["trace_id"]]
    assert names(spans) == sorted(["Req " + r.json()["id"], "Tokenizer", "tokenize", "dispatch", "Detokenizer",
                                   "detokenize"])


def test_level_2_adds_thread_spans_and_major_stages(traced, receiver):
    r = complete(traced[2])
    spans = trace_of(receiver, r, expected=10)
    assert names(spans) == sorted(["Req " + r.json()["id"], "Tokenizer", "Scheduler [TP 0]", "Detokenizer", *MAJOR])
    by_name = {s["name"].split(" (")[0]: s for s in spans}
    root = by_name["Req " + r.json()["id"]]
    for thread in ("Tokenizer", "Scheduler [TP 0]", "Detokenizer"):
        t = by_name[thread]
        assert t["parent_id"] == root["span_id"]
        assert t["attributes"]["thread_label"] == thread.split(" ")[0]
        assert len(t["attributes"]["host_id"]) == 8 and t["attributes"]["pid"] > 0
        assert root["start"] <= t["start"] <= t["end"] <= root["end"]  # one clock across processes
    for stage, thread in (("tokenize", "Tokenizer"), ("dispatch", "Tokenizer"), ("queue", "Scheduler [TP 0]"),
                          ("prefill", "Scheduler [TP 0]"), ("decode", "Scheduler [TP 0]"), ("detokenize", "Detokenizer")):
        assert by_name[stage]["parent_id"] == by_name[thread]["span_id"]
        assert by_name[thread]["start"] <= by_name[stage]["start"] <= by_name[stage]["end"] <= by_name[thread]["end"]
    assert by_name["queue"]["end"] <= by_name["prefill"]["start"] <= by_name["prefill"]["end"] <= by_name["decode"]["start"]
    assert by_name["Scheduler [TP 0]"]["attributes"]["tp_rank"] == 0


def test_level_3_adds_chunks_and_decode_steps(traced, receiver):
    r = complete(traced[3])
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    chunks = -(-prompt_tokens // 8)
    spans = trace_of(receiver, r, expected=10 + chunks + 5)
    counted = names(spans)
    assert counted.count("prefill_chunk") == chunks
    assert counted.count("decode_step") == 5  # 6 tokens: the first comes from prefill
    prefill = next(s for s in spans if s["name"] == "prefill")
    decode = next(s for s in spans if s["name"] == "decode")
    for s in spans:
        if s["name"] == "prefill_chunk":
            assert s["parent_id"] == prefill["span_id"] and s["attributes"]["num_tokens"] <= 8
        if s["name"] == "decode_step":
            assert s["parent_id"] == decode["span_id"] and s["attributes"]["batch_size"] >= 1
    assert len({s["span_id"] for s in spans}) == len(spans)


def test_propagation_and_root_attributes(traced, receiver):
    server = traced[2]
    long_prompt = "Where did the time of this request go? Into prefill, decode and the queue. " * 3
    r = complete(server, headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"}, max_tokens=5,
                 prompt=long_prompt)
    assert r.status_code == 200
    _, trace_id, root_id, flags = r.headers["traceparent"].split("-")
    assert trace_id == CALLER_TRACE and flags == "01"
    spans = trace_of(receiver, r, expected=10)
    root = next(s for s in spans if s["name"].startswith("Req "))
    assert root["span_id"] == root_id and root["parent_id"] == CALLER_SPAN
    assert root["trace_state"] == "vendor=1"
    usage, a = r.json()["usage"], root["attributes"]
    assert a["gen_ai.usage.prompt_tokens"] == a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.completion_tokens"] == a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.usage.cached_tokens"] == a["gen_ai.usage.cache_read.input_tokens"] == 0
    assert a["gen_ai.request.max_tokens"] == 5 and a["gen_ai.request.temperature"] == 0
    assert a["gen_ai.request.top_p"] == 1.0 and a["gen_ai.request.top_k"] == -1  # defaults in effect
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == model_name(server)
    assert a["rid"] == a["gen_ai.request.id"] == r.json()["id"]
    assert "gen_ai.prompt" not in a and "gen_ai.completion" not in a  # no content unless asked
    assert not {"gen_ai.input.messages", "gen_ai.output.messages"} & set(a)
    assert a["input.value"] == a["output.value"] and "--trace-include-content" in a["input.value"]  # says so
    e2e = (root["end"] - root["start"]) / 1e9
    assert 0 <= a["gen_ai.latency.time_in_queue"] <= a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    assert abs(a["gen_ai.latency.e2e"] - e2e) < 0.01
    assert a["gen_ai.latency.time_in_model_prefill"] + a["gen_ai.latency.time_in_model_decode"] <= e2e
    queue = next(s for s in spans if s["name"] == "queue")
    assert abs(a["gen_ai.latency.time_in_queue"] - (queue["end"] - queue["start"]) / 1e9) < 0.05
    assert a["gen_ai.latency.time_in_queue"] > 0

    again = complete(server, headers={"traceparent": "00-not-a-traceparent"}, max_tokens=5, prompt=long_prompt)
    assert again.status_code == 200 and again.headers["traceparent"].split("-")[1] != CALLER_TRACE
    spans = trace_of(receiver, again, expected=10)
    root = next(s for s in spans if s["name"].startswith("Req "))
    assert root["parent_id"] is None
    assert root["attributes"]["gen_ai.usage.cached_tokens"] > 0  # the same prompt again
    assert "prefix_cache.hit" in {e["name"] for e in root["events"]}


def test_refused_and_cancelled_requests_end_their_traces_with_their_outcomes(traced, receiver):
    """A client's 4xx and a client that went away are not the server's errors: their roots'
    status stays unset (as OpenTelemetry's HTTP conventions have a server's 4xx), the outcome
    says what happened."""
    server = traced[3]
    bad = complete(server, max_tokens=10**6)
    assert bad.status_code == 400
    spans = trace_of(receiver, bad)
    root = next(s for s in spans if s["name"].startswith("Req "))
    assert root["status"] == 0 and root["attributes"]["error.type"] == "invalid_request_error"
    assert root["attributes"]["loupe.request.outcome"] == "rejected"
    assert "exception" in {e["name"] for e in root["events"]}

    body = {"model": model_name(server), "prompt": "one two", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as stream:
        header = stream.headers["traceparent"]
        for i, _ in enumerate(stream.iter_lines()):
            if i > 6:
                break
    trace_id = header.split("-")[1]
    spans = receiver.wait_for(lambda s: sum(x["trace_id"] == trace_id and (x["name"].startswith("Req ") or
                                            x["name"].startswith("Scheduler") or x["name"].startswith("Detok"))
                                            for x in s) == 3)
    spans = [s for s in spans if s["trace_id"] == trace_id]
    root = next(s for s in spans if s["name"].startswith("Req "))
    assert root["status"] == 0 and root["attributes"]["loupe.request.outcome"] == "cancelled"
    assert root["attributes"]["gen_ai.request.stream"] is True
    scheduler = next(s for s in spans if s["name"].startswith("Scheduler"))
    assert scheduler["status"] == 0 and scheduler["attributes"]["finish_reason"] == "abort"
    samples = wait_metrics(server, lambda m: m.get("loupe_open_requests") == 0)
    assert samples["loupe_open_requests"] == 0 and samples["loupe_num_running_reqs"] == 0


def start_traces(receiver) -> list[list[dict]]:
    """The spans of each `loupe start` trace the receiver has."""
    spans = receiver.spans()
    roots = [s for s in spans if s["name"] == "loupe start"]
    return [[s for s in spans if s["trace_id"] == root["trace_id"]] for root in roots]


def test_a_servers_start_is_one_trace(traced, receiver):
    """Each of the module's servers: its start from launch to ready, a span per child process
    from its spawn to its readiness, and the scheduler's phases inside."""
    traces = receiver.wait_for(lambda spans: sum(s["name"] == "loupe start" for s in spans) >= len(traced))
    assert traces
    for spans in start_traces(receiver):
        by_name = {s["name"]: s for s in spans}
        root = by_name["loupe start"]
        assert root["status"] == 0 and root["attributes"]["loupe.start.seconds"] > 0
        children = {s["name"] for s in spans if s["parent_id"] == root["span_id"]}
        assert children == {"exporter process", "scheduler process", "detokenizer process"}
        scheduler = by_name["scheduler process"]
        phases = {s["name"]: s for s in spans if s["parent_id"] == scheduler["span_id"]}
        assert {"start the interpreter and import", "build", "load weights", "size the KV cache"} <= set(phases)
        assert phases["load weights"]["attributes"]["bytes"] > 0 and "quantization" in phases["load weights"][
            "attributes"]
        assert phases["size the KV cache"]["attributes"]["tokens"] > 0
        for child in (s for s in spans if s["parent_id"] == root["span_id"]):
            assert root["start"] <= child["start"] <= child["end"] <= root["end"], child["name"]
            assert child["attributes"]["ready"] is True and child["status"] == 0


def test_a_failed_start_ends_its_trace_with_the_cause(tmp_path, receiver):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    done = run_server("--enable-tracing", "--otlp-endpoint", f"127.0.0.1:{receiver.port}", "--model-path",
                      str(empty), timeout=120)
    assert done.returncode == 1 and "cannot start" in done.stderr

    def failed(spans):
        return [s for s in spans if s["name"] == "loupe start" and s["status"] == 2]

    (root,) = failed(receiver.wait_for(lambda spans: failed(spans)))
    spans = [s for s in receiver.spans() if s["trace_id"] == root["trace_id"]]
    (error,) = [s for s in spans if s["name"] == "error"]
    assert "cannot load the tokenizer" in error["attributes"]["exception.message"] and error["status"] == 2
    assert "cannot load the tokenizer" in root["status_message"]


def test_http_protobuf_export_to_a_bare_host_port(tiny_model_dir, logs):
    with HttpReceiver() as receiver, traced_server(
            tiny_model_dir("llama"), logs, f"http://127.0.0.1:{receiver.port}",
            env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                 "LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "50"}) as server:
        r = complete(server)
        spans = trace_of(receiver, r, expected=10)
        assert len(spans) >= 10 and set(receiver.paths) == {"/v1/traces"}


def test_a_hanging_or_absent_backend_leaves_serving_alone(tiny_model_dir, logs, unused_port):
    env = {"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "10", "OTEL_BSP_MAX_QUEUE_SIZE": "20",
           "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "60"}
    with GrpcReceiver(hang_seconds=30) as hanging, running(
            traced_server(tiny_model_dir("llama"), logs, f"127.0.0.1:{hanging.port}", env=env),
            traced_server(tiny_model_dir("llama"), logs, f"127.0.0.1:{unused_port}",
                          env={**env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2"})) as (slow, absent):
        for server in (slow, absent):
            took = []
            for _ in range(8):
                t = time.perf_counter()
                r = complete(server, max_tokens=8)
                took.append(time.perf_counter() - t)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            assert max(took) < 5
            assert httpx.get(server.url("/health"), timeout=1).status_code == 200
        dropped = wait_metrics(slow, lambda m: m.get("loupe_tracing_spans_dropped_total", 0) > 0, timeout=20)
        assert dropped["loupe_tracing_spans_dropped_total"] > 0
        failed = wait_metrics(absent, lambda m: m.get("loupe_tracing_spans_failed_total", 0) > 0, timeout=40)
        assert failed["loupe_tracing_spans_failed_total"] > 0
        assert "dropped" in slow.log()  # the periodic warning
        # Where spans go, said at start, and that nothing answers there: the lines to look for.
        assert f"exporting spans over OTLP grpc to http://127.0.0.1:{unused_port}" in absent.log()
        assert f"nothing answers at 127.0.0.1:{unused_port}" in absent.log()
        assert "nothing answers" not in slow.log()


def test_shutdown_flushes_queued_spans(tiny_model_dir, logs):
    with GrpcReceiver() as receiver, traced_server(
            tiny_model_dir("llama"), logs, f"127.0.0.1:{receiver.port}",
            env={"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "60000",
                 "LOUPE_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE": "10000"}) as server:
        r = complete(server)
        assert r.status_code == 200
        time.sleep(0.5)
        assert receiver.spans() == []  # nothing is due for a minute
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(20) == 0
        spans = [s for s in receiver.spans() if s["trace_id"] == r.headers["traceparent"].split("-")[1]]
        assert len(spans) >= 10 + 5


def test_tracing_without_opentelemetry_refuses_to_start(tmp_path, tiny_model_dir):
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    done = run_server("--enable-tracing", "--port", 1, "--model-path", tiny_model_dir("llama"), timeout=60,
                      env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install opentelemetry-sdk" in lines[0], done.stderr


def test_concurrent_traced_requests_keep_their_own_traces(traced, receiver):
    server = traced[3]
    results = []

    def one(i):
        results.append(complete(server, prompt=f"one two three {i}", max_tokens=4 + i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        n = r.json()["usage"]["completion_tokens"]
        spans = trace_of(receiver, r, expected=10 + n - 1 + 1)
        assert names(spans).count("decode_step") == n - 1
        root = next(s for s in spans if s["name"].startswith("Req "))
        assert root["attributes"]["gen_ai.usage.completion_tokens"] == n


def test_the_span_exporters_death_leaves_serving_alone_and_it_starts_again(tiny_model_dir, logs):
    with GrpcReceiver() as receiver, traced_server(tiny_model_dir("llama"), logs, f"127.0.0.1:{receiver.port}",
                                                   env={"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "50"}) as server:
        exporter = int(re.search(r"\[exporter pid:(\d+)\]", server.log()).group(1))
        results = []

        def load():  # requests in flight while it dies
            results.extend(complete(server, max_tokens=200).status_code for _ in range(6))

        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(0.5)
        os.kill(exporter, signal.SIGKILL)
        worker.join(120)
        assert results == [200] * 6, results
        assert server.wait_log(f"the span exporter (pid {exporter}) died", 10), server.log()
        samples = wait_metrics(server, lambda m: m.get("loupe_tracing_exporter_restarts_total") == 1)
        assert samples["loupe_tracing_exporter_restarts_total"] == 1
        after = complete(server)  # traced, exported by the new exporter
        assert after.status_code == 200
        trace_id = after.headers["traceparent"].split("-")[1]
        spans = receiver.wait_for(lambda s: any(x["trace_id"] == trace_id and x["name"].startswith("Req ")
                                                for x in s), timeout=30)
        assert spans
        exported = wait_metrics(server, lambda m: m.get("loupe_tracing_spans_exported_total", 0) > 0)
        assert exported["loupe_tracing_spans_exported_total"] > 0
        assert httpx.get(server.url("/health"), timeout=5).status_code == 200
