"""The routes beside generation: health, what the server serves, and tracing control. The
models are their answers' one definition (built here, described in /openapi.json)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from importlib.metadata import version
from typing import Literal

from pydantic import BaseModel, ConfigDict

from loupe.config import ServerArgs
from loupe.core import SamplingParams, TokenizedRequest
from loupe.server.protocol import APIError
from loupe.server.tokenizer_manager import TokenizerManager

HEALTH_GENERATE_TIMEOUT = 30


class Status(BaseModel):
    status: Literal["ok"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ServedModel(BaseModel):
    served_model_name: str
    model_path: str
    device: str
    dtype: str
    quantization: Literal["none", "int4"]
    load_seconds: float
    max_total_tokens: int
    context_length: int


class ModelInfoResponse(ServedModel):
    is_generation: bool


class ServerInfo(ServedModel):
    """The server's flags (all but --api-key, by their Python names), what it serves, and
    loupe's version."""

    model_config = ConfigDict(extra="allow")  # the flags

    version: str


class TracingSettings(BaseModel):
    """Whether requests are traced and how; the settings only when tracing is enabled."""

    enabled: bool
    level: int | None = None
    sampling_ratio: float | None = None
    parent_based: bool | None = None
    keep_errors: bool | None = None
    keep_slower_than_ms: float | None = None
    keep_cancelled: bool | None = None


class AdminAPI:
    def __init__(self, manager: TokenizerManager, args: ServerArgs, model_name: str):
        self.manager, self.args, self.model_name = manager, args, model_name

    async def health_generate(self) -> Status:
        """One token generated, within HEALTH_GENERATE_TIMEOUT seconds."""
        manager = self.manager
        outputs = manager.generate(TokenizedRequest(f"health-{uuid.uuid4().hex}", manager.encode("ping") or [0],
                                                    SamplingParams(max_new_tokens=1)))
        try:
            async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT):
                async for _ in outputs:
                    pass
        except TimeoutError:
            raise APIError(503, f"no token generated in {HEALTH_GENERATE_TIMEOUT} s") from None
        finally:
            await outputs.aclose()
        return Status(status="ok")

    def model_info(self) -> ModelInfoResponse:
        return ModelInfoResponse(served_model_name=self.model_name, is_generation=True, **self.manager.model_info)

    def server_info(self) -> ServerInfo:
        flags = {k: v for k, v in dataclasses.asdict(self.args).items() if k != "api_key"}
        return ServerInfo(**{**flags, "served_model_name": self.model_name, **self.manager.model_info,
                             "version": version("loupe")})

    def models(self) -> ModelList:
        card = ModelCard(id=self.model_name, object="model", created=int(time.time()), owned_by="loupe",
                         root=self.manager.model_info.get("model_path"),
                         max_model_len=self.manager.limits.context_length)
        return ModelList(object="list", data=[card])

    def tracing_settings(self) -> TracingSettings:
        tracer = self.manager.tracer
        return TracingSettings(enabled=tracer is not None, **(tracer.control.settings() if tracer else {}))

    def change_tracing(self, changes: dict) -> TracingSettings:
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
