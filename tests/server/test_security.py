"""Security: the API key on every route but /health, CORS only when asked for, malformed
HTTP refused, and no prompt or completion text in the logs."""

import socket

import httpx
import pytest
from assertions import assert_openai_error

from harness import LiveServer

pytestmark = pytest.mark.slow  # it starts servers

KEY = "s3cret-key"
ORIGIN = "https://app.example"
SECRET_PROMPT = "zebra-quartz-7391 says"


@pytest.fixture(scope="module")
def guarded(server_logs, tiny_flags):
    with LiveServer(*tiny_flags, "--cors-allow-origins", f"{ORIGIN}, https://other.example",
                    "--log-level", "debug", "--log-requests", log_dir=server_logs, api_key=KEY) as server:
        yield server


def test_every_route_but_health_needs_the_api_key(guarded):
    with guarded.client() as http:
        paths = http.get("/openapi.json").json()["paths"]
    routes = [(method.upper(), path) for path, ops in paths.items() for method in ops]
    assert len(routes) >= 14 and ("GET", "/metrics") in routes and ("POST", "/tracing") in routes
    with httpx.Client(base_url=guarded.base_url, timeout=30, trust_env=False) as http:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer s3cret-kez"}, {"Authorization": f"Bearer {KEY}x"}):
                r = http.request(method, path, headers=headers, json={} if method == "POST" else None)
                if path == "/health":
                    assert r.status_code == 200
                else:
                    assert_openai_error(r, 401, param=None)
        # The schema itself is a route: without the key, nothing of it shows.
        assert_openai_error(http.get("/openapi.json"), 401, param=None)


def test_cors_answers_only_the_origins_given(guarded, bundled_server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with httpx.Client(timeout=30, trust_env=False) as http:
        # Off by default: no CORS header at all, and a preflight is not approved.
        plain = bundled_server.url("/v1/models")
        assert "access-control-allow-origin" not in http.get(plain, headers={"Origin": ORIGIN}).headers
        assert "access-control-allow-origin" not in http.options(plain, headers=preflight).headers
        # With --cors-allow-origins: a preflight needs no key, the answers name the origin.
        r = http.options(guarded.url("/v1/chat/completions"), headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = http.get(guarded.url("/v1/models"), headers={"Origin": ORIGIN, **guarded.headers})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        elsewhere = {**preflight, "Origin": "https://evil.example"}
        r = http.options(guarded.url("/v1/chat/completions"), headers=elsewhere)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = http.get(guarded.url("/v1/models"), headers={"Origin": "https://evil.example", **guarded.headers})
        assert "access-control-allow-origin" not in r.headers


def raw_http(server, request: bytes) -> bytes:
    """Send bytes as they are; what comes back before the server closes or stops answering."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(request)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("request_bytes", [
    # Both framings at once: a proxy and the server could split the stream differently.
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    # Two different lengths.
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
    # A header line 100 kB long.
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    # Ten thousand headers.
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(10_000)) + b"\r\n",
], ids=["cl-and-te", "two-lengths", "huge-header", "many-headers"])
def test_malformed_http_is_refused_and_the_server_goes_on(bundled_server, request_bytes):
    answer = raw_http(bundled_server, request_bytes)
    assert 400 <= status_of(answer) < 500, answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, "a request was smuggled behind the first"
    assert httpx.get(bundled_server.url("/health"), trust_env=False).status_code == 200


def test_no_prompt_or_completion_text_in_the_logs(guarded):
    with guarded.client() as http:
        r = http.post("/generate", json={"text": SECRET_PROMPT, "sampling_params": {"max_new_tokens": 12}})
        assert r.status_code == 200
        completion = r.json()["text"]
        r = http.post("/v1/completions", json={"model": "x", "prompt": SECRET_PROMPT})  # refused: unknown model
        assert r.status_code == 404
    assert guarded.wait_log("request rid=", 10)  # --log-requests logged it, at --log-level debug
    log = guarded.log()
    assert SECRET_PROMPT not in log and "zebra" not in log
    assert len(completion.strip()) < 4 or completion.strip() not in log
