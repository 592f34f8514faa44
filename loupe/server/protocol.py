"""Request bodies of the HTTP API (OpenAI-compatible and native), and the error answer."""

from __future__ import annotations

from typing import Literal

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from loupe.core import MAX_TOP_LOGPROBS, Bootstrap


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, whatever its status, in OpenAI's shape."""

    error: ErrorBody


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 ran: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.ran = ran  # it reached the scheduler and failed there: its outcome is counted already

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def answer(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self, headers: dict | None = None) -> Response:
        return Response(self.answer().model_dump_json(), status_code=self.status, media_type="application/json",
                        headers=headers)


# Parameters loupe does not implement, with the values that ask for nothing: any other
# value is refused with a 400 naming the parameter, never ignored.
UNSUPPORTED = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},), "frequency_penalty": (0,),
    "presence_penalty": (0,), "repetition_penalty": (1,), "logit_bias": ({},), "best_of": (1,), "echo": (False,),
    "suffix": ("",), "audio": (), "modalities": (["text"],), "prediction": (), "web_search_options": (),
    "logprob_start_len": (-1,), "token_ids_logprob": (), "lora_path": (),
}


class StrictModel(BaseModel):
    # Strict: a string where a number belongs is a 400, not silently converted. Other
    # fields are accepted (a router adds its own, clients send harmless ones such as `user`),
    # except the parameters in UNSUPPORTED.
    model_config = ConfigDict(strict=True, extra="allow")

    def refuse_unsupported(self) -> None:
        """A 400 naming the first parameter given that loupe would otherwise ignore."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value is not None and value not in UNSUPPORTED[name]:
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")


class StreamOptions(StrictModel):
    include_usage: bool = False


class RequestExtras(StrictModel):
    """What any generation request may carry besides its prompt and sampling: OpenAI's
    `metadata` (`{"trace": "true"|"false"}` chooses whether it is traced), and the fields
    SGLang's router adds for a prefill/decode pair."""

    metadata: dict[str, str] | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    def trace_wanted(self) -> bool | None:
        """The request's own tracing choice; None when it makes none."""
        choice = (self.metadata or {}).get("trace")
        if choice is None:
            return None
        if choice.lower() not in ("true", "false"):
            raise APIError(400, f'metadata.trace must be "true" or "false", got {choice!r}', param="metadata.trace")
        return choice.lower() == "true"

    def bootstrap(self) -> Bootstrap | None:
        given = (self.bootstrap_host, self.bootstrap_port, self.bootstrap_room)
        if all(value is None for value in given):
            return None
        if any(value is None for value in given):
            raise APIError(400, "bootstrap_host, bootstrap_port and bootstrap_room go together",
                           param="bootstrap_room")
        return Bootstrap(*given)


class SamplingFields(RequestExtras):
    """Sampling options shared by both OpenAI endpoints; loupe's extensions included."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling_dict(self, max_tokens: int | None) -> dict:
        return {
            "max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed, "stop": self.stop,
            "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos, **self.logprob_params(),
        }

    def logprob_params(self) -> dict:
        """`logprobs` and `top_logprobs` as SamplingParams takes them (each endpoint spells them its way)."""
        return {}


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs: true

    def logprob_params(self) -> dict:
        return {"logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs or 0}


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's: the chosen token's, and the top N's

    def logprob_params(self) -> dict:
        return {"logprobs": self.logprobs is not None, "top_logprobs": self.logprobs or 0}


class GenerateRequest(RequestExtras):
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict = Field(default_factory=dict)
    stream: bool = False
    rid: str | None = None
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)  # needs return_logprob
    return_text_in_logprobs: bool = False


class TraceLevel(StrictModel):
    level: int
