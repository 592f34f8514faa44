"""Trace control on a live server (tiny model, a real OTLP receiver): head sampling, the
caller's flag, a request's own choice, and the level and ratio changed while serving."""

import secrets

import httpx
import openai
import pytest

from harness import LiveServer, wait_metrics

pytestmark = pytest.mark.slow  # it starts servers


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, receiver):
    """Traced, at a sampling ratio of 0: only what a caller or the request itself asks for."""
    with LiveServer("--model-path", tiny_model_dir("llama"), "--max-total-tokens", 4096, "--enable-tracing",
                    "--otlp-endpoint", f"http://127.0.0.1:{receiver.port}", "--trace-sampling-ratio", 0,
                    log_dir=str(tmp_path_factory.mktemp("trace-control"))) as s:
        yield s


def generate(server: LiveServer, headers: dict | None = None, **extra) -> tuple[str, str]:
    """(trace id, sampled flag) of the response's traceparent."""
    body = {"text": "one two three", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}, **extra}
    r = httpx.post(server.url("/generate"), json=body, headers=headers or {}, timeout=60, trust_env=False)
    assert r.status_code == 200, r.text
    _, trace_id, _, flags = r.headers["traceparent"].split("-")
    return trace_id, flags


def traced(receiver, trace_id: str) -> list[dict]:
    """The spans of a trace that is expected whole (root and detokenizer's)."""
    spans = receiver.wait_for(lambda all_spans: {"detokenize", "decode"} <= {
        s["name"] for s in all_spans if s["trace_id"] == trace_id})
    return [s for s in spans if s["trace_id"] == trace_id]


def assert_untraced(receiver, trace_ids: list[str], then_traced: str) -> None:
    """None of `trace_ids` left a span, by the time the later `then_traced` arrived whole."""
    spans = traced(receiver, then_traced) and receiver.spans()
    assert not [s["name"] for s in spans if s["trace_id"] in trace_ids]


def test_unsampled_requests_record_nothing_and_say_so(server, receiver):
    plain = [generate(server) for _ in range(3)]
    assert {flags for _, flags in plain} == {"00"}
    wanted, flags = generate(server, metadata={"trace": "true"})  # a request's own choice, at ratio 0
    assert flags == "01"
    assert_untraced(receiver, [trace_id for trace_id, _ in plain], then_traced=wanted)


def test_the_openai_client_asks_for_a_trace_through_metadata(server, receiver):
    model = httpx.get(server.url("/v1/models"), trust_env=False).json()["data"][0]["id"]
    with openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=60) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=3, metadata={"trace": "true"})
    trace_id = raw.headers["traceparent"].split("-")[1]
    root = next(s for s in traced(receiver, trace_id) if s["name"].startswith("Req "))
    assert root["attributes"]["gen_ai.request.model"] == model
    bad = httpx.post(server.url("/generate"), json={"text": "x", "metadata": {"trace": "maybe"}}, trust_env=False)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata.trace"


def test_the_callers_sampled_flag_decides(server, receiver):
    caller = secrets.token_hex(16)
    sampled, flags = generate(server, {"traceparent": f"00-{caller}-{secrets.token_hex(8)}-01"})
    assert (sampled, flags) == (caller, "01")
    traced(receiver, caller)
    assert httpx.post(server.url("/tracing"), json={"sampling_ratio": 1.0}, trust_env=False).status_code == 200
    try:
        declined = secrets.token_hex(16)
        assert generate(server, {"traceparent": f"00-{declined}-{secrets.token_hex(8)}-00"}) == (declined, "00")
        everyone, flags = generate(server)
        assert flags == "01"
        assert_untraced(receiver, [declined], then_traced=everyone)
    finally:
        httpx.post(server.url("/tracing"), json={"sampling_ratio": 0.0}, trust_env=False)


def test_the_level_changes_while_serving(server, receiver):
    def set_level(level: int) -> dict:
        r = httpx.post(server.url("/set_trace_level"), json={"level": level}, trust_env=False)
        assert r.status_code == 200, r.text
        return r.json()

    try:
        assert set_level(2) == {"enabled": True, "level": 2, "sampling_ratio": 0.0, "parent_based": True,
                                "keep_errors": False, "keep_slower_than_ms": None, "keep_cancelled": False}
        at_two, _ = generate(server, metadata={"trace": "true"})
        names = {s["name"] for s in traced(receiver, at_two)}
        assert "decode" in names and "decode_step" not in names and "prefill_chunk" not in names
        set_level(0)
        off, flags = generate(server, metadata={"trace": "true"})  # off is off
        assert flags == "00"
        set_level(3)
        on, _ = generate(server, metadata={"trace": "true"})
        assert "decode_step" in {s["name"] for s in traced(receiver, on)}
        assert_untraced(receiver, [off], then_traced=on)
    finally:
        set_level(3)
    assert httpx.get(server.url("/tracing"), trust_env=False).json()["level"] == 3


@pytest.mark.parametrize("path,body,param", [("/set_trace_level", {"level": 7}, "level"),
                                             ("/set_trace_level", {"level": "high"}, "level"),
                                             ("/tracing", {"sampling_ratio": -0.5}, "sampling_ratio"),
                                             ("/tracing", {"keep_slower_than_ms": -1}, "keep_slower_than_ms"),
                                             ("/tracing", {"colour": "red"}, "colour")])
def test_bad_settings_are_refused_naming_them_and_change_nothing(server, path, body, param):
    before = httpx.get(server.url("/tracing"), trust_env=False).json()
    r = httpx.post(server.url(path), json=body, trust_env=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.get(server.url("/tracing"), trust_env=False).json() == before


def test_a_server_without_tracing_says_so(bundled_server):
    assert httpx.get(bundled_server.url("/tracing"), trust_env=False).json() == {"enabled": False}
    r = httpx.post(bundled_server.url("/set_trace_level"), json={"level": 3}, trust_env=False)
    assert r.status_code == 400 and r.json()["error"]["code"] == "tracing_disabled"


def test_tail_keeping_exports_cancelled_and_slow_requests_whole_and_counts_the_rest(server, receiver):
    def change(**settings) -> None:
        r = httpx.post(server.url("/tracing"), json=settings, trust_env=False)
        assert r.status_code == 200, r.text

    change(keep_errors=True, keep_cancelled=True, keep_slower_than_ms=60_000)
    try:
        fast, flags = generate(server)  # neither failed nor slow: recorded, held, discarded
        assert flags == "00"
        body = {"text": "one two", "stream": True, "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
        with httpx.stream("POST", server.url("/generate"), json=body, timeout=60, trust_env=False) as stream:
            _, gone, _, flags = stream.headers["traceparent"].split("-")
            for i, _ in enumerate(stream.iter_lines()):
                if i > 4:
                    break  # the client leaves: the request is cancelled
        assert flags == "00"
        processes = ("Req ", "Tokenizer", "Scheduler", "Detokenizer")
        spans = receiver.wait_for(lambda all_spans: {p for p in processes for s in all_spans
                                                     if s["trace_id"] == gone and s["name"].startswith(p)}
                                  == set(processes))
        spans = [s for s in spans if s["trace_id"] == gone]
        root = next(s for s in spans if s["name"].startswith("Req "))
        assert root["status"] == 0 and root["attributes"]["loupe.request.outcome"] == "cancelled"  # not an error
        assert "error.type" not in root["attributes"]
        assert ("cancelled", "client_disconnected") in {(e["name"], e["attributes"].get("reason")) for e in root["events"]}
        assert {"queue", "prefill", "decode", "decode_step"} <= {s["name"] for s in spans}

        change(keep_slower_than_ms=0)  # now every request is slow enough
        slow, flags = generate(server)
        assert flags == "00"
        assert {"tokenize", "queue", "prefill", "decode", "detokenize"} <= {s["name"] for s in traced(receiver, slow)}
        assert_untraced(receiver, [fast], then_traced=slow)
        want = {'loupe_tracing_traces_kept_total{reason="cancelled"}': 1,
                'loupe_tracing_traces_kept_total{reason="slow"}': 1,
                'loupe_tracing_traces_discarded_total{reason="ok"}': 1}
        samples = wait_metrics(server, lambda m: all(m.get(k, 0) >= v for k, v in want.items()))
        assert all(samples.get(k, 0) >= v for k, v in want.items()), samples
    finally:
        change(keep_errors=False, keep_cancelled=False, keep_slower_than_ms=None)
