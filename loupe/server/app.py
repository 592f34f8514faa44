"""The HTTP app: every route, each handing its work to one of the APIs, and how errors are
answered. The guard (guard.py) runs before any of them."""

from __future__ import annotations

import asyncio
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loupe.config import ServerArgs
from loupe.core import Outcome
from loupe.server.admin_api import AdminAPI, ModelInfoResponse, ModelList, ServerInfo, Status, TracingSettings
from loupe.server.guard import OPEN_ROUTES, install_guard
from loupe.server.intake import Intake
from loupe.server.metrics import Metrics
from loupe.server.native import GenerateResponse
from loupe.server.native_api import NativeAPI
from loupe.server.openai_api import ChatCompletion, ChatCompletionChunk, OpenAIAPI, TextCompletion, TextCompletionChunk
from loupe.server.openapi import METRICS_TEXT, answers, install_openapi
from loupe.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, GenerateRequest, TraceLevel
from loupe.server.streaming import ClientDisconnected, json_answer, trace_headers
from loupe.server.tokenizer_manager import TokenizerManager


def create_app(manager: TokenizerManager, args: ServerArgs, metrics: Metrics, model_name: str) -> FastAPI:
    app = FastAPI(title="loupe", version=version("loupe"), docs_url=None, redoc_url=None)
    intake = Intake(manager, model_name, args.disaggregation_mode,
                    args.allowed_prefill_hosts if args.disaggregation_prefill_hosts else None,
                    args.disaggregation_secret is not None)
    admin = AdminAPI(manager, args, model_name)

    def error(exc: APIError, headers: dict | None = None) -> Response:
        """An error answer, counted in the metrics by its status and outcome."""
        metrics.requests.labels(status=f"http_{exc.status}").inc()
        if not exc.ran:
            metrics.outcomes.labels(outcome=Outcome.of_refusal(exc.status)).inc()
        return exc.response(headers)

    install_openapi(app, [model_name], lambda: manager.limits, OPEN_ROUTES if args.api_key else None)
    install_guard(app, args, manager, error)
    install_error_handlers(app, manager, error)

    @app.on_event("startup")
    async def start_background_tasks() -> None:
        app.state.tasks = [asyncio.create_task(manager.run_inbox()),
                           asyncio.create_task(manager.flush_spans_periodically())]

    add_admin_routes(app, admin, metrics)
    add_generation_routes(app, OpenAIAPI(intake), NativeAPI(intake))
    return app


def add_admin_routes(app: FastAPI, admin: AdminAPI, metrics: Metrics) -> None:
    @app.get("/health", responses=answers(Status))
    async def health() -> Response:
        """Up and serving (503 while starting or draining)."""
        return json_answer(Status(status="ok"))

    @app.get("/health_generate", responses=answers(Status))
    async def health_generate() -> Response:
        return json_answer(await admin.health_generate())

    @app.get("/tracing", responses=answers(TracingSettings))
    async def tracing() -> Response:
        """Whether requests are traced: the level, the sampling, the keep rules."""
        return json_answer(admin.tracing_settings())

    @app.post("/tracing", responses=answers(TracingSettings, 400))
    async def change_tracing(changes: dict) -> Response:
        """Change the tracing settings while serving; requests that arrive afterwards follow them."""
        return json_answer(admin.change_tracing(changes))

    @app.post("/set_trace_level", responses=answers(TracingSettings, 400))
    async def set_trace_level(body: TraceLevel) -> Response:
        """0 (off) to 3, for the requests that arrive afterwards."""
        return json_answer(admin.change_tracing({"level": body.level}))

    @app.get("/metrics", response_class=PlainTextResponse, responses=METRICS_TEXT)
    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    @app.get("/model_info", responses=answers(ModelInfoResponse))
    @app.get("/get_model_info", responses=answers(ModelInfoResponse))
    async def model_info() -> Response:
        return json_answer(admin.model_info())

    @app.get("/server_info", responses=answers(ServerInfo))
    @app.get("/get_server_info", responses=answers(ServerInfo))
    async def server_info() -> Response:
        """What a router or an operator asks of a worker: its flags (the API key left out),
        the model it serves, and loupe's version."""
        return json_answer(admin.server_info())

    @app.get("/v1/models", responses=answers(ModelList))
    async def models() -> Response:
        return json_answer(admin.models())


def add_generation_routes(app: FastAPI, openai: OpenAIAPI, native: NativeAPI) -> None:
    @app.post("/v1/chat/completions", responses=answers(ChatCompletion, 400, 404, 502, stream=ChatCompletionChunk))
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await openai.chat(body, request)

    @app.post("/v1/completions", responses=answers(TextCompletion, 400, 404, 502, stream=TextCompletionChunk))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await openai.completions(body, request)

    @app.post("/generate", responses=answers(GenerateResponse, 400, 502, stream=GenerateResponse))
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await native.generate(body, request)


def install_error_handlers(app: FastAPI, manager: TokenizerManager, error) -> None:
    """Every error in OpenAI's shape; a request refused after its trace opened ends it."""

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        """The framework's own refusals (unknown route, wrong method, a body it cannot
        parse); not counted as requests (a router probes routes loupe does not have)."""
        return APIError(exc.status_code, str(exc.detail)).response(getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        trace = getattr(request.state, "trace", None)
        if trace is not None and not trace.finished:  # refused before reaching the scheduler
            manager.tracer.finish(trace, None, Outcome.of_refusal(exc.status), exc.type, exc.message)
        return error(exc, trace_headers(trace))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        """A bug: still an answer in OpenAI's shape (the traceback goes to the log)."""
        return error(APIError(500, "internal server error", code="internal_error"))

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody is there to read it

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        field = ".".join(where) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return error(APIError(400, message, param=field))
