"""The guard: what is answered before any route runs. Malformed or oversized headers, a
missing API key, a server starting or draining, generation beyond capacity, a body over the
limit; and CORS for browsers."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from loupe.config import ServerArgs
from loupe.server.protocol import APIError
from loupe.server.tokenizer_manager import TokenizerManager

OPEN_ROUTES = {"/health"}  # answered without an API key
GENERATION_ROUTES = {"/v1/chat/completions", "/v1/completions", "/generate"}  # bounded by --max-queued-requests
MAX_HEADERS, MAX_HEADER_BYTES = 100, 32 * 1024

ErrorAnswer = Callable[..., Response]  # (APIError, headers=None) -> the response, counted


def install_guard(app: FastAPI, args: ServerArgs, manager: TokenizerManager, error: ErrorAnswer) -> None:
    """The guard around every route, and CORS outside it (so a browser's preflight needs no key)."""

    def refusal(request: Request) -> Response | None:
        if args.api_key and request.url.path not in OPEN_ROUTES:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {args.api_key}".encode()):
                return error(APIError(401, "missing or wrong API key", code="invalid_api_key"))
        if manager.draining and request.url.path != "/metrics":
            return error(APIError(503, "the server is shutting down", code="draining"), {"Retry-After": "1"})
        if not manager.ready and request.url.path != "/metrics":
            starting = APIError(503, "the server is starting: the model is not loaded yet")
            # Health probes while starting are expected, not refused requests: not counted.
            return starting.response() if request.url.path in OPEN_ROUTES else error(starting)
        return None

    app.add_middleware(GuardMiddleware, refusal=refusal, max_body=int(args.max_request_body_mb * 2**20),
                       max_in_flight=args.max_in_flight, error=error)
    if args.allowed_origins:  # added last, so outermost
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "traceparent", "tracestate"],
                           expose_headers=["traceparent"])


class GuardMiddleware:
    """Answers a request itself when its headers are malformed or too large (and closes the
    connection), when `refusal` gives a response (no API key, not ready), when
    `max_in_flight` generation requests are already held (503 with Retry-After: a bounded
    queue, not an unbounded wait), or for a body over `max_body` bytes (413 before anything
    reads or parses it).

    Plain ASGI on purpose: `@app.middleware("http")` wraps `receive` so that
    `request.is_disconnected()` never sees a client leave, and a non-streaming request
    whose client went away would then run to its end instead of being aborted."""

    def __init__(self, app, refusal, max_body: int, max_in_flight: int, error):
        self.app, self.refusal, self.max_body, self.error = app, refusal, max_body, error
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # generation requests between arrival and their last byte sent

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        generation = request.method == "POST" and request.url.path in GENERATION_ROUTES
        bad_headers = self.malformed(scope["headers"])
        response = self.error(bad_headers, {"Connection": "close"}) if bad_headers else self.refusal(request)
        if response is None and generation and self.in_flight >= self.max_in_flight:
            response = self.error(APIError(503, f"the server is at capacity ({self.max_in_flight} requests running "
                                                "or queued); retry later", code="overloaded"), {"Retry-After": "1"})
        if response is None and request.method == "POST":
            response, receive = await self.bounded_body(request, receive)
        if response is not None:
            await response(scope, receive, send)
            return
        self.in_flight += generation
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= generation

    @staticmethod
    def malformed(headers: list[tuple[bytes, bytes]]) -> APIError | None:
        """What is wrong with headers the HTTP parser let through: too many or too large (it
        refuses those only when they arrive in pieces), or both Content-Length and
        Transfer-Encoding, which a proxy in front may read otherwise (request smuggling)."""
        if len(headers) > MAX_HEADERS or sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
            return APIError(431, f"the request headers are too large (at most {MAX_HEADERS} headers, "
                                 f"{MAX_HEADER_BYTES} bytes)", code="headers_too_large")
        names = {name for name, _ in headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            return APIError(400, "a request may not have both Content-Length and Transfer-Encoding",
                            code="ambiguous_length")
        return None

    async def bounded_body(self, request: Request, receive):
        """A 413 for a body larger than the limit, by its Content-Length or, without one, by
        reading at most the limit; else None and a `receive` that gives the body as read."""
        too_large = APIError(413, f"the request body is larger than {self.max_body} bytes "
                                  "(--max-request-body-mb)", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            return (self.error(too_large) if length.isdigit() and int(length) > self.max_body else None), receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return Response(status_code=499), receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return self.error(too_large), receive
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what comes after the body: a disconnect, say
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return None, replay
