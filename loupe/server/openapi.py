"""The OpenAPI document (/openapi.json): every route's request and response bodies as the
server really takes and answers them, so that a client generator, a router or a fuzzer can
rely on it.

Request bodies are protocol.py's models, with what the engine checks added: `model` takes
only the served model's names, sampling values their ranges (`core.SamplingParams.validate`),
token ids the vocabulary. Response bodies are the models each answer is built from
(`openai_api.py`, `native.py`, `admin_api.py`, `protocol.ErrorResponse`), named in the routes'
`responses=`. A constraint is written here only if the server refuses every value outside it, for any
model: a schema looser than the server is merely vague, one stricter than it is wrong.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from loupe.core import RequestLimits
from loupe.server.native import GenerateResponse
from loupe.server.openai_api import STREAM_EVENTS as OPENAI_EVENTS
from loupe.server.protocol import ErrorResponse

# ---- request bodies the routes take as plain dicts ----------------------------------------


class NativeSamplingParams(BaseModel):
    """/generate's `sampling_params`: the engine's own names; null or absent means the default."""

    model_config = ConfigDict(extra="forbid")  # an unknown name is a 400

    max_new_tokens: int | None = 128
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = -1
    min_p: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False


# POST /tracing: the settings to change, any of them (an absent one stays as it is; an
# unknown one is a 400).
TRACING_CHANGES = {"type": "object", "additionalProperties": False, "title": "TracingChanges", "properties": {
    "level": {"type": "integer"}, "sampling_ratio": {"type": "number"}, "parent_based": {"type": "boolean"},
    "keep_errors": {"type": "boolean"}, "keep_slower_than_ms": {"type": ["number", "null"]},
    "keep_cancelled": {"type": "boolean"},
}}

# What core.SamplingParams.validate and tracing.sampling.RULES accept, by field name (OpenAI's
# and the engine's); the token limits come from the model. JSON Schema's number and string
# keywords pass null and other types by.
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
RANGES = {
    "temperature": {"minimum": 0}, "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1, "not": {"const": 0}}, "min_p": {"minimum": 0, "maximum": 1},
    "seed": {"minimum": 0, "exclusiveMaximum": 2**63}, "stop": {"minLength": 1, "items": {"minLength": 1}},
    "stop_token_ids": {"items": {"minimum": 0}}, "n": {"const": 1},
    "level": {"minimum": 0, "maximum": 3}, "sampling_ratio": {"minimum": 0, "maximum": 1},
    "keep_slower_than_ms": {"minimum": 0},
}


# ---- the routes' answers ------------------------------------------------------------------

JSON, SSE = "application/json", "text/event-stream"


def answers(body: type[BaseModel], *errors: int, stream: type[BaseModel] | None = None) -> dict:
    """A route's `responses=`: its 200 body (and, with `stream`, the events of its
    `stream: true` answer), and the errors it answers itself besides the guard's (401, 413, 503)."""
    ok: dict = {"model": body}
    if stream is not None:
        ok["content"] = {SSE: {"schema": sse_event(stream)}}
    return {200: ok, **{status: {"model": ErrorResponse, "description": ERRORS[status]} for status in errors}}


ERRORS = {
    400: "Bad input: malformed JSON, a missing or ill-typed field, a value out of range, a prompt "
         "too long for the context, a parameter loupe does not support",
    401: "No API key, or the wrong one (--api-key)",
    404: "`model` names no model this server serves",
    413: "The request body is larger than --max-request-body-mb",
    502: "The request's KV never came from the prefill server (a disaggregated decode server)",
    503: "The server is starting, draining, at capacity, or a serving process died "
         "(a Retry-After header when retrying soon may succeed)",
}


def sse_event(event: type[BaseModel]) -> dict:
    """Server-sent events: each `data:` holds one JSON event (or, if the request fails once
    streaming, an error in OpenAI's shape); the last is `[DONE]`."""
    payload = {"anyOf": [ref(event), ref(ErrorResponse)]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": JSON, "contentSchema": payload}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


# /metrics: Prometheus' text, or OpenMetrics when the Accept header asks for it.
METRICS_TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}},
                                  "application/openmetrics-text": {"schema": {"type": "string"}}}}}

STREAM_EVENTS = [*OPENAI_EVENTS, GenerateResponse, ErrorResponse]  # named by sse_event

# ---- the document -------------------------------------------------------------------------


def install_openapi(app: FastAPI, model_names: list[str], limits: Callable[[], RequestLimits],
                    open_routes: set[str] | None) -> None:
    """Serve this document at /openapi.json, built on first ask (the server is ready by then:
    the guard refuses every route but /metrics before, so `limits` are known). `open_routes`:
    those answered without the API key; None when the server asks for no key."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = complete(doc, model_names, limits(), open_routes)
        return app.openapi_schema

    app.openapi = openapi


def complete(doc: dict, model_names: list[str], limits: RequestLimits, open_routes: set[str] | None) -> dict:
    """FastAPI's document, made true: request constraints, the guard's answers on every
    route, the API key where one is asked for, no 422 (validation errors are 400s), and the
    models that stream events name."""
    schemas = doc["components"]["schemas"]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    add_models(schemas, [*STREAM_EVENTS, NativeSamplingParams])
    schemas["TracingChanges"] = TRACING_CHANGES
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                           "maximum": limits.vocab_size - 1}}
    most = min(limits.context_length, limits.max_total_tokens) - 1  # the prompt has a token at least
    ranges = {**RANGES, **{name: {"minimum": 1, "maximum": most} for name in TOKEN_LIMITS},
              "model": {"enum": model_names}}  # requests and answers alike: only the served names
    for schema in schemas.values():
        for name, field in schema.get("properties", {}).items():
            field.update(ranges.get(name, {}))
    schemas["GenerateRequest"]["properties"].update(input_ids={"anyOf": [token_ids, {"type": "null"}]},
                                                    sampling_params=ref(NativeSamplingParams))
    # /generate takes exactly one of text and input_ids.
    schemas["GenerateRequest"]["oneOf"] = [{"required": ["text"], "properties": {"text": {"type": "string"}}},
                                           {"required": ["input_ids"], "properties": {"input_ids": {"type": "array"}}}]
    # One prompt: a string, token ids, or a list holding one string.
    schemas["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [
        {"type": "string"}, token_ids, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
    ]}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            keyed = open_routes is not None and path not in open_routes
            guard(method, operation["responses"], keyed, metrics=path == "/metrics")
            if open_routes is not None and not keyed:
                operation["security"] = []  # answered without the key
    if open_routes is not None:
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"apiKey": []}]
    doc["paths"]["/tracing"]["post"]["requestBody"]["content"][JSON]["schema"] = {
        "$ref": "#/components/schemas/TracingChanges"}
    return doc


def guard(method: str, responses: dict, keyed: bool, metrics: bool) -> None:
    """The answers the guard gives before the route runs (`keyed`: only with the API key;
    /metrics answers while starting and draining too), and none of FastAPI's 422s."""
    responses.pop("422", None)
    for status, answered in {"401": keyed, "413": method == "post", "503": not metrics}.items():
        if answered:
            responses.setdefault(status, {"description": ERRORS[int(status)],
                                          "content": {JSON: {"schema": ref(ErrorResponse)}}})


def add_models(schemas: dict, models: list[type[BaseModel]]) -> None:
    """Put `models` and the models they hold into the document's components."""
    _, defs = models_json_schema([(m, "serialization") for m in models],
                                 ref_template="#/components/schemas/{model}")
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
