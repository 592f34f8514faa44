"""End to end against a real tracing backend: Arize Phoenix, run offline from `.phoenix-venv`.

One Phoenix (`phoenix serve`, temporary working dir, free loopback ports) and two traced
servers on the bundled model: one exports over OTLP/gRPC into Phoenix's gRPC port, the other
over OTLP HTTP/protobuf into Phoenix's HTTP port (`/v1/traces`). Each server tags its spans
with its own Phoenix project (`openinference.project.name` in OTEL_RESOURCE_ATTRIBUTES).
Requests go through the official `openai` client with a W3C `traceparent`; the spans are then
read back through Phoenix's REST API (`GET /v1/projects/{project}/spans`).

Phoenix is big, so it lives in its own venv: `make phoenix-setup` (a dependency of `make
test`). Without it this test fails, it does not skip.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time

import httpx
import openai
import pytest

from harness import LiveProcess, LiveRouter, LiveServer, free_port, running

pytestmark = pytest.mark.slow  # it starts servers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOENIX_VENV = os.environ.get("LOUPE_PHOENIX_VENV", os.path.join(REPO, ".phoenix-venv"))
PHOENIX_BIN = os.path.join(PHOENIX_VENV, "bin", "phoenix")
MODEL = "SmolLM2-135M-Instruct"
READY_TIMEOUT = 120  # seconds, Phoenix and each server; the machines are small and shared
SPANS_TIMEOUT = 30  # seconds to wait for a request's spans to be queryable in Phoenix

THREAD_SPAN = {
    "Tokenizer": re.compile(r"^Tokenizer \(host:[0-9a-f]{8} \| pid:\d+\)$"),
    "Scheduler": re.compile(r"^Scheduler \[TP 0\] \(host:[0-9a-f]{8} \| pid:\d+\)$"),
    "Detokenizer": re.compile(r"^Detokenizer \(host:[0-9a-f]{8} \| pid:\d+\)$"),
}
# stage span -> the thread span it belongs under
STAGE_PARENT = {"tokenize": "Tokenizer", "dispatch": "Tokenizer", "queue": "Scheduler",
                "prefill": "Scheduler", "decode": "Scheduler", "detokenize": "Detokenizer"}
VARIANTS = {"grpc": "loupe-e2e-grpc", "http/protobuf": "loupe-e2e-http"}  # protocol -> project


def base_env() -> dict[str, str]:
    """This environment without any OTEL_* / PHOENIX_* settings that could leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Phoenix plus one traced server per OTLP protocol, all started at once (they start in
    parallel), all stopped at the end, and nothing left running."""
    if not os.access(PHOENIX_BIN, os.X_OK):
        pytest.fail(f"Arize Phoenix is not installed ({PHOENIX_BIN} is missing): run "
                    "`make phoenix-setup` (a dependency of `make test`) to create .phoenix-venv",
                    pytrace=False)
    logs = str(tmp_path_factory.mktemp("phoenix-e2e"))
    work = os.path.join(logs, "phoenix-working-dir")
    os.makedirs(work)
    http_port, grpc_port = free_port(), free_port()
    phoenix_env = {
        **base_env(),
        "PHOENIX_WORKING_DIR": work,  # its SQLite database and files: thrown away afterwards
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",  # offline: no WASM/web-font downloads
        "PHOENIX_HOST": "127.0.0.1",  # the HTTP server (UI, REST, OTLP/HTTP)
        "PHOENIX_PORT": str(http_port),
        "PHOENIX_GRPC_PORT": str(grpc_port),  # OTLP/gRPC (Phoenix binds it on every interface)
        "PYTHONUNBUFFERED": "1",
    }
    phoenix = LiveProcess([PHOENIX_BIN, "serve"], name="phoenix", port=http_port, ready_path="/healthz",
                          log_dir=logs, env=phoenix_env, ready_timeout=READY_TIMEOUT)
    servers = {}
    for protocol, project in VARIANTS.items():
        endpoint = (f"http://127.0.0.1:{grpc_port}" if protocol == "grpc"
                    else f"http://127.0.0.1:{http_port}")  # loupe adds /v1/traces
        env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
               "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={project}",
               "LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "100"}
        servers[protocol] = LiveServer("--enable-tracing", "--otlp-endpoint", endpoint, log_dir=logs, env=env,
                                       base_env=base_env(), compile=True, ready_timeout=READY_TIMEOUT)
    everything = [phoenix, *servers.values()]
    try:
        with running(*everything):
            print(f"Phoenix healthy after {phoenix.ready_seconds:.1f} s")
            for server in servers.values():
                print(f"{server.name} ready after {server.ready_seconds:.1f} s")
            yield {"phoenix": phoenix.base_url, "phoenix_proc": phoenix, "servers": servers,
                   "grpc_port": grpc_port, "logs": logs}
    finally:
        # Loupe servers must exit on SIGTERM by themselves, children included; Phoenix too.
        killed = {p.name: p.killed for p in everything if p.killed}
        assert not killed, f"processes that outlived SIGTERM and had to be killed: {killed}"
        still = {p.name: p.alive_pids() for p in everything if p.alive_pids()}
        assert not still, f"processes left running after teardown: {still}"


def phoenix_spans(base: str, project: str, trace_id: str) -> list[dict]:
    r = httpx.get(f"{base}/v1/projects/{project}/spans",
                  params={"trace_id": trace_id, "limit": 1000}, timeout=10, trust_env=False)
    if r.status_code == 404:  # the project appears with its first span
        return []
    assert r.status_code == 200, (r.status_code, r.text)
    body = r.json()
    assert body.get("next_cursor") is None, "more than 1000 spans in one trace?"
    return body["data"]


def wait_for_trace(base: str, project: str, trace_id: str, want: set[str], phoenix: LiveProcess) -> list[dict]:
    """Poll Phoenix until the trace holds a root and every span name family in `want`."""
    start = time.monotonic()
    spans: list[dict] = []
    while time.monotonic() < start + SPANS_TIMEOUT:
        spans = phoenix_spans(base, project, trace_id)
        names = {family(s["name"]) for s in spans}
        if want <= names:
            print(f"{project}: trace {trace_id} complete in Phoenix after "
                  f"{time.monotonic() - start:.2f} s ({len(spans)} spans)")
            return spans
        time.sleep(0.25)
    raise AssertionError(
        f"Phoenix project {project!r} never showed trace {trace_id} with spans {sorted(want)}; "
        f"it has {sorted(s['name'] for s in spans)}\nPhoenix log tail:\n{phoenix.log()[-3000:]}")


def family(name: str) -> str:
    """'Req abc' -> 'Req'; 'Scheduler [TP 0] (host:..)' -> 'Scheduler'; slices unchanged."""
    return name.split(" ", 1)[0]


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def send_requests(port: int) -> list[dict]:
    """One chat and one text completion through the official client, each with its own caller
    trace; what was sent and what came back."""
    sent = []
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                       timeout=120, http_client=httpx.Client(trust_env=False)) as client:
        for operation in ("chat", "text_completion"):
            header, trace_id, span_id = traceparent()
            start = time.monotonic()
            if operation == "chat":
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                    max_tokens=6, temperature=0, extra_headers={"traceparent": header})
            else:
                raw = client.completions.with_raw_response.create(
                    model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0.5,
                    top_p=0.9, extra_headers={"traceparent": header})
            print(f"{operation} request: {time.monotonic() - start:.2f} s")
            sent.append({"operation": operation, "trace_id": trace_id, "span_id": span_id,
                         "response": raw.parse(), "traceparent": raw.headers.get("traceparent")})
    return sent


@pytest.mark.parametrize("protocol", list(VARIANTS))
def test_traces_land_in_phoenix(stack, protocol):
    server = stack["servers"][protocol]
    project = VARIANTS[protocol]
    want = {"Req", *THREAD_SPAN, *STAGE_PARENT}
    for sent in send_requests(server.port):
        trace_id, caller_span = sent["trace_id"], sent["span_id"]
        usage = sent["response"].usage
        where = f"[{protocol}, {sent['operation']}, trace {trace_id}]"
        spans = wait_for_trace(stack["phoenix"], project, trace_id, want, stack["phoenix_proc"])

        # every span is in the caller's trace and the tree hangs together under the caller
        assert {s["context"]["trace_id"] for s in spans} == {trace_id}, where
        by_id = {s["context"]["span_id"]: s for s in spans}
        assert len(by_id) == len(spans), f"{where} duplicate span ids"
        for s in spans:
            assert s["parent_id"] == caller_span or s["parent_id"] in by_id, (where, s["name"])

        # the root: the caller's span is its parent; it is what the response header names
        roots = [s for s in spans if family(s["name"]) == "Req"]
        assert len(roots) == 1, (where, [s["name"] for s in roots])
        root = roots[0]
        attrs = root["attributes"]
        assert root["parent_id"] == caller_span, where
        assert root["name"] == f"Req {attrs['rid']}", where
        assert attrs["gen_ai.request.id"] == attrs["rid"], where
        assert sent["traceparent"], f"{where} the response has no traceparent header"
        version, header_trace, header_span, _flags = sent["traceparent"].split("-")
        assert (version, header_trace, header_span) == ("00", trace_id, root["context"]["span_id"]), \
            (where, sent["traceparent"], root["context"])
        assert root["status_code"] == "OK", (where, root["status_code"], root["status_message"])
        assert attrs["gen_ai.response.id"] == sent["response"].id and attrs["gen_ai.provider.name"] == "loupe", where

        # usage: the response's numbers, under both the old and the current GenAI names
        assert attrs["gen_ai.operation.name"] == sent["operation"], where
        assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.response.model"] == MODEL, where
        assert attrs["gen_ai.request.max_tokens"] == 6, where
        assert usage.completion_tokens == 6, (where, usage)
        assert attrs["gen_ai.usage.prompt_tokens"] == usage.prompt_tokens, (where, usage)
        assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens, (where, usage)
        assert attrs["gen_ai.usage.completion_tokens"] == usage.completion_tokens, (where, usage)
        assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens, (where, usage)
        details = usage.prompt_tokens_details
        cached = details.cached_tokens if details and details.cached_tokens is not None else 0
        assert attrs["gen_ai.usage.cached_tokens"] == cached, (where, usage)
        assert attrs["gen_ai.usage.cache_read.input_tokens"] == cached, (where, usage)
        assert attrs["gen_ai.response.finish_reasons"] == [sent["response"].choices[0].finish_reason], where
        for key in ("time_in_queue", "time_to_first_token", "e2e", "time_in_model_prefill",
                    "time_in_model_decode"):
            assert isinstance(attrs[f"gen_ai.latency.{key}"], float), (where, key)
        if sent["operation"] == "text_completion":
            assert attrs["gen_ai.request.temperature"] == pytest.approx(0.5), where
            assert attrs["gen_ai.request.top_p"] == pytest.approx(0.9), where

        # Phoenix's own reading of them: an LLM span whose token counts are the response's
        assert root["span_kind"] == "LLM", (where, root["span_kind"])
        assert attrs["llm.model_name"] == MODEL, where
        assert attrs["llm.token_count.prompt"] == usage.prompt_tokens, where
        assert attrs["llm.token_count.completion"] == usage.completion_tokens, where
        assert attrs["llm.token_count.total"] == usage.total_tokens, where
        assert json.loads(attrs["llm.invocation_parameters"])["max_tokens"] == 6, where

        # thread spans under the root, one each, and the stages under their thread span
        threads = {}
        for label, pattern in THREAD_SPAN.items():
            matching = [s for s in spans if pattern.match(s["name"])]
            assert len(matching) == 1, (where, label, [s["name"] for s in spans])
            threads[label] = matching[0]
            assert matching[0]["parent_id"] == root["context"]["span_id"], (where, label)
            assert matching[0]["attributes"]["thread_label"] == label, where
        for stage, label in STAGE_PARENT.items():
            matching = [s for s in spans if s["name"] == stage]
            assert len(matching) == 1, (where, stage, len(matching))
            assert matching[0]["parent_id"] == threads[label]["context"]["span_id"], (where, stage)
        # level 3 (the default): prefill chunks and decode steps too; the first token comes
        # from prefill, so decode runs one step per further token
        prefill = next(s for s in spans if s["name"] == "prefill")["context"]["span_id"]
        decode = next(s for s in spans if s["name"] == "decode")["context"]["span_id"]
        chunks = [s for s in spans if s["name"] == "prefill_chunk"]
        steps = [s for s in spans if s["name"] == "decode_step"]
        assert chunks and all(s["parent_id"] == prefill for s in chunks), where
        assert usage.completion_tokens - 1 <= len(steps) <= usage.completion_tokens, (where, len(steps))
        assert all(s["parent_id"] == decode for s in steps), where
        # readable: every span below the root has a kind, each decode step says which it is
        assert {s["span_kind"] for s in spans if s is not root} == {"CHAIN"}, where
        assert sorted(s["attributes"]["step"] for s in steps) == list(range(1, len(steps) + 1)), where
        assert all(s["attributes"]["batch_size"] >= 1 and "batch_id" in s["attributes"] for s in steps), where
        assert all(len(str(attrs[f"gen_ai.latency.{key}"])) <= 12 for key in ("e2e", "time_to_first_token")), where


def test_a_prefill_decode_pair_and_the_router_make_one_trace_in_phoenix(stack, tiny_model_dir):
    """SGLang's router in PD mode, a prefill and a decode server (tiny model), all three
    exporting to Phoenix's gRPC port (its `default` project): one trace holds them all."""
    endpoint, logs, bootstrap_port = f"127.0.0.1:{stack['grpc_port']}", stack["logs"], free_port()
    flags = ["--model-path", tiny_model_dir("llama"), "--enable-tracing", "--otlp-endpoint", f"http://{endpoint}"]
    env = {"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "100"}
    prefill = LiveServer(*flags, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                         bootstrap_port, log_dir=logs, env=env)
    decode = LiveServer(*flags, "--disaggregation-mode", "decode", log_dir=logs, env=env)
    router = LiveRouter("--pd-disaggregation", "--prefill", prefill.base_url, bootstrap_port, "--decode",
                        decode.base_url, "--enable-trace", "--otlp-traces-endpoint", endpoint, num_workers=2,
                        log_dir=logs)
    # The client's connection stays open until the trace is in (see tests/disagg/test_pd_tracing.py).
    with running(prefill, decode), router, httpx.Client(timeout=60, trust_env=False) as client:
        r = client.post(router.base_url + "/generate", json={"text": "Where did the time go?",
                        "sampling_params": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text
        trace_id = r.headers["traceparent"].split("-")[1]
        spans = wait_for_trace(stack["phoenix"], "default", trace_id,
                               {"http_request", "Req", "bootstrap", "kv_transfer", "kv_receive", "decode_step"},
                               stack["phoenix_proc"])
    by_id = {s["context"]["span_id"]: s for s in spans}
    roots = [s for s in spans if family(s["name"]) == "Req"]
    assert len(roots) == 2 and {by_id[s["parent_id"]]["name"] for s in roots} == {"http_request"}
    assert {s["attributes"]["disaggregation.role"] for s in roots} == {"prefill", "decode"}
    assert len({s["attributes"]["bootstrap_room"] for s in roots}) == 1
    transfer = next(s for s in spans if s["name"] == "kv_transfer")
    assert by_id[transfer["parent_id"]]["name"] == "prefill" and transfer["attributes"]["backend"] == "nixl"
