"""The HTTP routes: OpenAI-compatible chat and completions, native /generate, health, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loupe.config import ServerArgs
from loupe.core import (
    InvalidRequest,
    SamplingParams,
    TokenizedRequest,
    TokenLogprob,
    native_logprobs,
)
from loupe.ipc import RequestOutput
from loupe.server.metrics import Metrics
from loupe.server.openapi import (
    METRICS_TEXT,
    ChatCompletion,
    ChatCompletionChunk,
    GenerateResponse,
    ModelInfoResponse,
    ModelList,
    ServerInfo,
    Status,
    TextCompletion,
    TextCompletionChunk,
    TracingSettings,
    answers,
    install_openapi,
)
from loupe.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    RequestExtras,
    SamplingFields,
    TraceLevel,
)
from loupe.server.tokenizer_manager import TokenizerManager
from loupe.tracing.spans import RequestTrace, now

OPEN_ROUTES = {"/health"}  # answered without an API key
GENERATION_ROUTES = {"/v1/chat/completions", "/v1/completions", "/generate"}  # bounded by --max-queued-requests
MAX_HEADERS, MAX_HEADER_BYTES = 100, 32 * 1024
DISCONNECT_POLL_SECONDS = 0.5
HEALTH_GENERATE_TIMEOUT = 30


class ClientDisconnected(Exception):
    pass


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


def create_app(manager: TokenizerManager, args: ServerArgs, metrics: Metrics, model_name: str) -> FastAPI:
    app = FastAPI(title="loupe", version=version("loupe"), docs_url=None, redoc_url=None)
    api = OpenAIRoutes(manager, metrics, model_name, args.disaggregation_mode,
                       args.allowed_prefill_hosts if args.disaggregation_prefill_hosts else None,
                       args.disaggregation_secret is not None)
    install_openapi(app, [model_name], lambda: manager.limits, OPEN_ROUTES if args.api_key else None)

    @app.on_event("startup")
    async def start_background_tasks() -> None:
        app.state.tasks = [asyncio.create_task(manager.run_inbox()),
                           asyncio.create_task(manager.flush_spans_periodically())]

    def refusal(request: Request) -> Response | None:
        if args.api_key and request.url.path not in OPEN_ROUTES:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {args.api_key}".encode()):
                return api.error(APIError(401, "missing or wrong API key", code="invalid_api_key"))
        if manager.draining and request.url.path != "/metrics":
            return api.error(APIError(503, "the server is shutting down", code="draining"), {"Retry-After": "1"})
        if not manager.ready and request.url.path != "/metrics":
            starting = APIError(503, "the server is starting: the model is not loaded yet")
            # Health probes while starting are expected, not refused requests: not counted.
            return starting.response() if request.url.path in OPEN_ROUTES else api.error(starting)
        return None

    app.add_middleware(GuardMiddleware, refusal=refusal, max_body=int(args.max_request_body_mb * 2**20),
                       max_in_flight=args.max_in_flight, error=api.error)
    if args.allowed_origins:  # added last, so outermost: a browser's preflight needs no API key
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "traceparent", "tracestate"],
                           expose_headers=["traceparent"])

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        """The framework's own refusals (unknown route, wrong method, a body it cannot
        parse) in OpenAI's shape too; not counted as requests (a router probes routes
        loupe does not have)."""
        return APIError(exc.status_code, str(exc.detail)).response(getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        trace = getattr(request.state, "trace", None)
        if trace is not None and not trace.finished:  # refused before reaching the scheduler
            manager.end_trace_with_error(trace, exc.TYPES.get(exc.status, "server_error"), exc.message)
        return api.error(exc, trace_headers(trace))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        """A bug: still an answer in OpenAI's shape (the traceback goes to the log)."""
        return api.error(APIError(500, "internal server error", code="internal_error"))

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody is there to read it

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return api.error(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        field = ".".join(where) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return api.error(APIError(400, message, param=field))

    @app.get("/health", responses=answers(Status))
    async def health() -> dict:
        """Up and serving (503 while starting or draining)."""
        return {"status": "ok"}

    @app.get("/health_generate", responses=answers(Status))
    async def health_generate() -> dict:
        outputs = manager.generate(TokenizedRequest(f"health-{uuid.uuid4().hex}", manager.encode("ping") or [0],
                                                    SamplingParams(max_new_tokens=1)))

        async def run() -> None:
            async for _ in outputs:
                pass

        try:
            await asyncio.wait_for(run(), HEALTH_GENERATE_TIMEOUT)
        except TimeoutError:
            raise APIError(503, f"no token generated in {HEALTH_GENERATE_TIMEOUT} s") from None
        finally:
            await outputs.aclose()
        return {"status": "ok"}

    @app.get("/tracing", responses=answers(TracingSettings))
    async def tracing() -> dict:
        """Whether requests are traced: the level, the sampling, the keep rules."""
        return api.tracing_settings()

    @app.post("/tracing", responses=answers(TracingSettings, 400))
    async def change_tracing(changes: dict) -> dict:
        """Change the tracing settings while serving; requests that arrive afterwards follow them."""
        return api.change_tracing(changes)

    @app.post("/set_trace_level", responses=answers(TracingSettings, 400))
    async def set_trace_level(body: TraceLevel) -> dict:
        """0 (off) to 3, for the requests that arrive afterwards."""
        return api.change_tracing({"level": body.level})

    @app.get("/metrics", response_class=PlainTextResponse, responses=METRICS_TEXT)
    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    @app.get("/model_info", responses=answers(ModelInfoResponse))
    @app.get("/get_model_info", responses=answers(ModelInfoResponse))
    async def model_info() -> dict:
        return {"served_model_name": model_name, "is_generation": True, **manager.model_info}

    @app.get("/server_info", responses=answers(ServerInfo))
    @app.get("/get_server_info", responses=answers(ServerInfo))
    async def server_info() -> dict:
        """What a router or an operator asks of a worker: its flags (the API key left out),
        the model it serves, and loupe's version."""
        flags = {k: v for k, v in dataclasses.asdict(args).items() if k != "api_key"}
        return {**flags, "served_model_name": model_name, **manager.model_info, "version": version("loupe")}

    @app.get("/v1/models", responses=answers(ModelList))
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "loupe",
                "root": manager.model_info.get("model_path"), "max_model_len": manager.limits.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", responses=answers(ChatCompletion, 400, 404, 502, stream=ChatCompletionChunk))
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.chat(body, request)

    @app.post("/v1/completions", responses=answers(TextCompletion, 400, 404, 502, stream=TextCompletionChunk))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.completions(body, request)

    @app.post("/generate", responses=answers(GenerateResponse, 400, 502, stream=GenerateResponse))
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await api.generate(body, request)

    return app


class OpenAIRoutes:
    def __init__(self, manager: TokenizerManager, metrics: Metrics, model_name: str, role: str = "null",
                 prefill_hosts: list[str] | None = None, has_secret: bool = False):
        self.manager, self.metrics, self.model_name = manager, metrics, model_name
        self.role = role  # --disaggregation-mode
        self.prefill_hosts, self.has_secret = prefill_hosts, has_secret  # where a decode server may connect

    def tracing_settings(self) -> dict:
        tracer = self.manager.tracer
        return {"enabled": tracer is not None, **(tracer.control.settings() if tracer else {})}

    def change_tracing(self, changes: dict) -> dict:
        tracer = self.manager.tracer
        if tracer is None:
            raise APIError(400, "tracing is not enabled: start the server with --enable-tracing",
                           code="tracing_disabled")
        try:
            tracer.control.update(changes)
        except ValueError as e:
            param, message = e.args
            raise APIError(400, message, param=param) from None
        return self.tracing_settings()

    def error(self, exc: APIError, headers: dict | None = None) -> JSONResponse:
        self.metrics.requests.labels(status=f"http_{exc.status}").inc()
        return exc.response(headers)

    # ---- OpenAI ---------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        rid = "chatcmpl-" + uuid.uuid4().hex
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        trace = self._start_trace(request, rid, "chat", body, messages)
        self._check_model_and_n(body)
        try:
            input_ids = self._tokenize(trace, self.manager.apply_chat_template, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if body.max_tokens is not None and max_tokens != body.max_tokens:
            # max_completion_tokens wins, as in OpenAI's API; the older max_tokens is still checked, not ignored.
            self._validated(rid, input_ids, body.sampling_dict(body.max_tokens), body, trace, openai_names=True)
        return await self._openai(body, request, rid, input_ids, max_tokens, trace)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        rid = "cmpl-" + uuid.uuid4().hex
        trace = self._start_trace(request, rid, "text_completion", body, body.prompt)
        self._check_model_and_n(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        input_ids = self._tokenize(trace, self.manager.encode, prompt) if isinstance(prompt, str) else prompt
        return await self._openai(body, request, rid, input_ids, body.max_tokens, trace)

    @staticmethod
    def _tokenize(trace: RequestTrace | None, tokenize, text) -> list[int]:
        started = now()
        try:
            input_ids = tokenize(text)
        except InvalidRequest as e:  # too long to fit, told by its size before tokenizing
            raise APIError(400, str(e), param=e.param) from None
        if trace and trace.recording:
            trace.mark("tokenize", started, {"num_tokens": len(input_ids)})
        return input_ids

    def _start_trace(self, request: Request, rid: str, operation: str, body, prompt) -> RequestTrace | None:
        """Open the request's trace; kept on `request.state` so an error response can end it."""
        attributes = {"gen_ai.operation.name": operation, "gen_ai.response.model": self.model_name,
                      "http.route": request.url.path}
        if not isinstance(body, GenerateRequest):
            attributes["gen_ai.request.model"] = body.model
        if self.role != "null":
            attributes["disaggregation.role"] = self.role
            if body.bootstrap_room is not None:
                attributes["bootstrap_room"] = body.bootstrap_room
        trace = self.manager.start_trace(rid, request.headers, attributes, prompt, body.trace_wanted())
        request.state.trace = trace
        return trace

    def _check_model_and_n(self, body: SamplingFields) -> None:
        body.refuse_unsupported()
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")

    async def _openai(self, body: SamplingFields, request: Request, rid: str, input_ids: list[int],
                      max_tokens: int | None, trace: RequestTrace | None) -> Response:
        if max_tokens is None:  # as much as the context (and the KV cache) leaves, like OpenAI
            limits = self.manager.limits
            max_tokens = max(min(limits.context_length, limits.max_total_tokens) - len(input_ids), 1)
        validated = self._validated(rid, input_ids, body.sampling_dict(max_tokens), body, trace, openai_names=True)
        outputs = self.manager.generate(validated, trace)
        fmt = OpenAIFormat(rid, self.model_name, rid.startswith("chatcmpl-"), int(time.time()),
                           validated.sampling.logprobs)
        headers = trace_headers(trace)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return sse(fmt.stream(outputs, usage), outputs, headers)
        final = await last_output(outputs, request)
        return JSONResponse(fmt.response(final), headers=headers)

    def _validated(self, rid: str, input_ids: list[int], params: dict, body: RequestExtras,
                   trace: RequestTrace | None, openai_names: bool = False) -> TokenizedRequest:
        bootstrap = None
        if self.role != "null":
            bootstrap = body.bootstrap()
            if bootstrap is None:
                raise APIError(400, f"this is the {self.role} server of a disaggregated pair: requests come "
                               "through SGLang's router in PD mode, which adds bootstrap_host, bootstrap_port "
                               "and bootstrap_room", param="bootstrap_room")
        try:
            if bootstrap is not None:
                bootstrap.check(self.prefill_hosts, self.has_secret, connects=self.role == "decode")
            return self.manager.validated(rid, input_ids, params, trace, bootstrap)
        except InvalidRequest as e:
            message, param = str(e), e.param
            if openai_names:
                message = message.replace("max_new_tokens", "max_tokens")
                param = {"max_new_tokens": "max_tokens", "input_ids": "prompt"}.get(param, param)
            raise APIError(400, message, param=param) from None

    # ---- native ---------------------------------------------------------------------------

    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        rid = body.rid or uuid.uuid4().hex
        prompt = body.text if body.text is not None else body.input_ids
        trace = self._start_trace(request, rid, "generate", body, prompt)
        body.refuse_unsupported()
        if (body.text is None) == (body.input_ids is None):
            raise APIError(400, "give exactly one of text and input_ids", param="text")
        if rid in self.manager.states:
            raise APIError(400, f"request id {rid!r} is already in use", param="rid")
        for name in ("logprobs", "top_logprobs"):  # asked for at the top level here, as in SGLang
            if name in body.sampling_params:
                raise APIError(400, f"sampling_params.{name}: use return_logprob and top_logprobs_num",
                               param=f"sampling_params.{name}")
        if body.top_logprobs_num and not body.return_logprob:
            raise APIError(400, "top_logprobs_num needs return_logprob: true", param="top_logprobs_num")
        params = {**body.sampling_params, "logprobs": body.return_logprob, "top_logprobs": body.top_logprobs_num}
        input_ids = body.input_ids if body.text is None else self._tokenize(trace, self.manager.encode, body.text)
        outputs = self.manager.generate(self._validated(rid, input_ids, params, body, trace), trace)
        if body.stream:
            return sse(native_stream(rid, outputs, body), outputs, trace_headers(trace))
        final = await last_output(outputs, request)
        meta = native_logprob_meta(body, final.logprobs, final.token_texts) if body.return_logprob else None
        return JSONResponse(native_body(rid, final.text, final, logprobs=meta), headers=trace_headers(trace))


class OpenAIFormat:
    """Shapes outputs as OpenAI chat.completion(.chunk) or text_completion objects."""

    def __init__(self, rid: str, model: str, chat: bool, created: int, logprobs: bool = False):
        self.rid, self.model, self.chat, self.created = rid, model, chat, created
        self.logprobs = logprobs  # whether the request asked for them
        self.text_offset = 0  # completions: where the next token's text starts in the whole text

    def _object(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        obj = {"id": self.rid, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    def response(self, out: RequestOutput) -> dict:
        reason, logprobs = finish_reason(out), self.logprobs_of(out)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs,
                      "finish_reason": reason}
            return self._object("chat.completion", [choice], usage(out))
        choice = {"index": 0, "text": out.text, "finish_reason": reason, "logprobs": logprobs}
        return self._object("text_completion", [choice], usage(out))

    def chunk(self, text: str | None, reason: str | None, first: bool = False, logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text or ""} if text or logprobs else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return self._object("chat.completion.chunk", [choice])
        return self._object("text_completion", [{"index": 0, "text": text or "", "finish_reason": reason,
                                                 "logprobs": logprobs}])

    def logprobs_of(self, out: RequestOutput) -> dict | None:
        """The `logprobs` of a choice for the tokens of `out`, in OpenAI's shape; None if not asked."""
        if not self.logprobs:
            return None
        logprobs, texts = out.logprobs or [], out.token_texts or {}
        if self.chat:
            return chat_logprobs(logprobs, texts)
        shaped = completion_logprobs(logprobs, texts, self.text_offset)
        self.text_offset += sum(len(token) for token in shaped["tokens"])
        return shaped

    async def stream(self, outputs: AsyncIterator[RequestOutput], include_usage: bool) -> AsyncIterator[dict]:
        """A chunk per output with new text (or, when asked, new tokens' logprobs: text held back
        as the possible start of a stop string comes in a later chunk than its tokens')."""
        if self.chat:
            yield self.chunk(None, None, first=True)
        async for out in outputs:
            raise_if_failed(out)
            logprobs = self.logprobs_of(out) if out.logprobs else None
            if out.text_delta or logprobs:
                yield self.chunk(out.text_delta, None, logprobs=logprobs)
            if out.finish_reason is None:
                continue
            yield self.chunk(None, finish_reason(out))
            if include_usage:
                obj = self._object("chat.completion.chunk" if self.chat else "text_completion", [], usage(out))
                yield obj


def chat_logprobs(logprobs: list[TokenLogprob], texts: dict[int, str]) -> dict:
    """A chat choice's `logprobs`: each token's text, logprob, UTF-8 bytes and top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        text = texts[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(*top) for top in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(logprobs: list[TokenLogprob], texts: dict[int, str], text_offset: int) -> dict:
    """A completion choice's `logprobs`, the legacy API's shape: parallel lists of the tokens'
    texts, logprobs, {text: logprob} of the top tokens and the chosen one, and where each
    token's text starts (counting from `text_offset`)."""
    tokens = [texts[lp.token_id] for lp in logprobs]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=text_offset)) if tokens else []
    top = [{texts[token]: value for token, value in lp.top} | {texts[lp.token_id]: lp.logprob} for lp in logprobs]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": top,
            "text_offset": offsets}


def usage(out: RequestOutput) -> dict:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
    }


def finish_reason(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def raise_if_failed(out: RequestOutput) -> None:
    """A request that failed in the engine: its KV never came from the prefill server (502),
    or a serving process died (503)."""
    if out.error:
        raise APIError(503 if out.error_code == "engine_unavailable" else 502, out.error, code=out.error_code)


def native_body(rid: str, text: str, out: RequestOutput, output_ids: list[int] | None = None,
                logprobs: dict | None = None) -> dict:
    meta = {"id": rid, "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens, "finish_reason": out.finish_reason, "matched_stop": out.matched_stop,
            **(logprobs or {})}
    return {"text": text, "output_ids": output_ids if output_ids is not None else out.token_ids, "meta_info": meta}


def native_logprob_meta(body: GenerateRequest, logprobs: list[TokenLogprob], texts: dict[int, str] | None) -> dict:
    """`output_token_logprobs` (and `output_top_logprobs`) as /generate was asked for them."""
    text = (texts or {}).get if body.return_text_in_logprobs else lambda token_id: None
    return native_logprobs(logprobs, body.top_logprobs_num > 0, text)


async def native_stream(rid: str, outputs: AsyncIterator[RequestOutput], body: GenerateRequest) -> AsyncIterator[dict]:
    """Each event holds the text, token ids and (if asked) logprobs so far, as other engines'
    native APIs do."""
    text, ids, logprobs, texts = "", [], [], {}
    async for out in outputs:
        raise_if_failed(out)
        ids.extend(out.token_ids)
        text = out.text if out.text is not None else text + out.text_delta
        meta = None
        if body.return_logprob:
            logprobs.extend(out.logprobs or [])
            texts.update(out.token_texts or {})
            meta = native_logprob_meta(body, logprobs, texts)
        yield native_body(rid, text, out, list(ids), meta)


async def last_output(outputs: AsyncIterator[RequestOutput], request: Request) -> RequestOutput:
    """Run a request to its end; abort it if the client goes away meanwhile."""

    async def consume() -> RequestOutput:
        ids, logprobs, texts, last = [], [], {}, None
        async for out in outputs:
            ids.extend(out.token_ids)
            logprobs.extend(out.logprobs or [])
            texts.update(out.token_texts or {})
            last = out
        last.token_ids = ids
        if last.logprobs is not None:
            last.logprobs, last.token_texts = logprobs, texts
        return last

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                break
            if await request.is_disconnected():
                raise ClientDisconnected
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await outputs.aclose()  # aborts the request if it has not finished
    out = task.result()
    raise_if_failed(out)
    return out


def trace_headers(trace: RequestTrace | None) -> dict | None:
    """The response names the request's root span, so a client can find its trace."""
    return {"traceparent": trace.ctx.traceparent} if trace is not None else None


def sse(events: AsyncIterator[dict], outputs: AsyncIterator[RequestOutput], headers: dict | None = None) -> StreamingResponse:
    """Server-sent events. If the client leaves, the stream is cancelled and closing `outputs`
    aborts the request."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
        except APIError as e:  # the status line is sent already: the error is an event, in OpenAI's shape
            yield f"data: {json.dumps({'error': e.body()}, ensure_ascii=False)}\n\n".encode()
        finally:
            await events.aclose()
            await outputs.aclose()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
