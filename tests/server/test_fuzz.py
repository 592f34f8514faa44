"""Schemathesis against a live server on the bundled model, driven by the server's own
/openapi.json: valid and invalid requests to every operation, checked for server errors,
for answers that break the schema, and for invalid data accepted. Every error must be in
OpenAI's shape, no request may hang, and the server must be healthy and serving afterwards.

Bounded: CASES per operation and mode, derandomized (the same cases each run),
valid cases asking for MAX_TOKENS tokens at most. The figures go to the test's output."""

from __future__ import annotations

import collections
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

from harness import BUNDLED_NAME, LiveServer

pytestmark = pytest.mark.slow  # it starts servers

CHECKS = [not_a_server_error, response_schema_conformance, negative_data_rejection]
CASES = 30  # per operation and mode; an operation without inputs has one distinct request
MAX_TOKENS = 3
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
CONTEXT = 256  # what a request accepted by mistake could generate, at most
ANSWER_TIMEOUT = 60  # seconds: a request unanswered for longer hangs
# Valid streamed requests, sent as they are: generated ones seldom both stream and fit.
STREAMED = {
    "POST /v1/chat/completions": {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}},
    "POST /v1/completions": {"model": BUNDLED_NAME, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
                             "stream": True},
    "POST /generate": {"text": "Once upon a time", "sampling_params": {"max_new_tokens": MAX_TOKENS}, "stream": True},
}


@pytest.fixture(scope="module")
def fuzzed(server_logs, receiver):
    """The bundled model, traced to a real receiver (so that the tracing routes get past their
    first check), tracing off until a case raises it."""
    with LiveServer("--context-length", CONTEXT, "--enable-tracing", "--otlp-endpoint",
                    f"127.0.0.1:{receiver.port}", "--trace-level", 0, log_dir=server_logs) as server:
        yield server


class Tally:
    """What the fuzz sent and got: cases, statuses and time per operation and mode, and the
    failures (the first report of each kind)."""

    def __init__(self):
        self.statuses: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
        self.seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.failures: dict[tuple, str] = {}

    def fail(self, row: tuple[str, str], status: str, kind: str, report: str) -> None:
        self.failures.setdefault((*row, status, kind), report)

    def reached(self) -> set[str]:
        """The operations that answered a 2xx at least once: got past validation."""
        return {label for (label, _), counts in self.statuses.items() if any(s.startswith("2") for s in counts)}

    def table(self, seconds: float) -> str:
        lines = [f"{'operation':28} {'mode':8} {'cases':>5} {'seconds':>7}  statuses"]
        for (label, mode), counts in sorted(self.statuses.items()):
            spread = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
            lines.append(f"{label:28} {mode:8} {counts.total():5} {self.seconds[label, mode]:7.1f}  {spread}")
        total = sum(counts.total() for counts in self.statuses.values())
        lines.append(f"{total} cases in {seconds:.0f} s, {len(self.failures)} distinct failures")
        return "\n".join(lines)


def bound_generation(case) -> None:
    """A valid case asks for MAX_TOKENS tokens at most, so that the run stays short on a CPU."""
    body = case.body
    if not isinstance(body, dict):
        return
    if case.operation.path == "/generate":
        params = body.setdefault("sampling_params", {}) or {}
        params["max_new_tokens"] = min(params.get("max_new_tokens") or MAX_TOKENS, MAX_TOKENS)
        body["sampling_params"] = params
    elif "model" in body:  # an OpenAI route: max_tokens, and max_completion_tokens if given, alike
        limit = min([MAX_TOKENS, *(body[f] for f in TOKEN_FIELDS if isinstance(body.get(f), int))])
        for field in TOKEN_FIELDS:
            if field == "max_tokens" or body.get(field) is not None:
                body[field] = limit


def openai_error_problem(response) -> str | None:
    """Why an error answer is not in OpenAI's shape; None if it is."""
    try:
        body = response.json()
        error = body["error"]
        assert set(body) == {"error"} and set(error) >= {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"not an OpenAI error: {response.text[:300]!r}"
    return None


def send(case, row: tuple[str, str], tally: Tally) -> None:
    """Send one case, check its answer, count it."""
    started = time.monotonic()
    try:
        response = case.call(timeout=ANSWER_TIMEOUT)
    except Exception as e:  # noqa: BLE001 (a timeout, a reset connection: each is a finding)
        tally.statuses[row]["no answer"] += 1
        tally.fail(row, "no answer", type(e).__name__, f"{e}\n{case.as_curl_command()}")
        return
    finally:
        tally.seconds[row] += time.monotonic() - started
    streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
    status = f"{response.status_code}{' stream' if streamed else ''}"
    tally.statuses[row][status] += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as failures:
        for failure in failures.exceptions:
            tally.fail(row, status, type(failure).__name__, str(failures))
    if response.status_code >= 400 and (problem := openai_error_problem(response)):
        tally.fail(row, status, "error shape", f"{problem}\n{case.as_curl_command()}")


def fuzz(operation, mode: GenerationMode, tally: Tally) -> None:
    row = (operation.label, mode.value)

    @settings(max_examples=CASES, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def one(case) -> None:
        if mode.is_positive:
            bound_generation(case)
        send(case, row, tally)

    one()


def test_fuzz_every_operation(fuzzed, capsys):
    schema = schemathesis.openapi.from_url(fuzzed.url("/openapi.json"), timeout=30)
    operations = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}
    tally = Tally()
    started = time.monotonic()
    for label, operation in operations.items():
        takes_input = bool(operation.body) or any(operation.iter_parameters())
        for mode in GenerationMode if takes_input else [GenerationMode.POSITIVE]:  # nothing to make invalid
            fuzz(operation, mode, tally)
        if label in STREAMED:
            send(operation.Case(body=STREAMED[label], media_type="application/json"), (label, "stream"), tally)
    seconds = time.monotonic() - started
    with capsys.disabled():
        print("\n" + tally.table(seconds))

    assert not tally.failures, "\n\n".join(f"{key}:\n{report}" for key, report in tally.failures.items())
    assert tally.reached() == set(operations), f"never past validation: {set(operations) - tally.reached()}"
    assert all(tally.statuses[label, "stream"] == {"200 stream": 1} for label in STREAMED), tally.statuses
    # Healthy and serving afterwards.
    with fuzzed.client() as http:
        assert http.get("/health").json() == {"status": "ok"}
        r = http.post("/v1/chat/completions", json={"model": BUNDLED_NAME, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    assert fuzzed.proc.poll() is None


def test_schema_names_the_served_model_and_no_422(fuzzed):
    """`model` takes only the served model's name, in requests and answers alike; a
    validation error is a 400 (never FastAPI's 422), and every error is in OpenAI's shape."""
    doc = httpx.get(fuzzed.url("/openapi.json"), timeout=30, trust_env=False).json()
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ChatCompletion", "TextCompletion"):
        assert schemas[name]["properties"]["model"]["enum"] == [BUNDLED_NAME], name
    responses = {status: answer for ops in doc["paths"].values() for op in ops.values()
                 for status, answer in op["responses"].items()}
    assert "422" not in responses and "HTTPValidationError" not in schemas
    assert all(answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
               for status, answer in responses.items() if status >= "400"), responses
