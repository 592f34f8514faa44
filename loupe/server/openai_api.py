"""OpenAI's chat and completions API: a request body in, its answer out, whole or streamed.
The models below are the answers' one definition: the routes build them, /openapi.json
describes them."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Request, Response
from pydantic import BaseModel

from loupe.core import TokenLogprob
from loupe.ipc import RequestOutput
from loupe.server.intake import Intake
from loupe.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from loupe.server.streaming import json_answer, last_output, raise_if_failed, sse
from loupe.tracing.spans import RequestTrace

# The engine's names for what OpenAI's API calls otherwise, as errors name them.
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "input_ids": "prompt"}

# ---- the answers --------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(ChatCompletion):
    """One event of a chat stream; with `stream_options.include_usage`, the last one has no
    choices and the usage."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(CompletionChoice):
    finish_reason: FinishReason | None


class TextCompletionChunk(TextCompletion):
    """One event of a completion stream (OpenAI names it `text_completion` too)."""

    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


STREAM_EVENTS = [ChatCompletionChunk, TextCompletionChunk]

# ---- the routes' work ---------------------------------------------------------------------


class OpenAIAPI:
    def __init__(self, intake: Intake):
        self.intake, self.manager, self.model_name = intake, intake.manager, intake.model_name

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        rid = "chatcmpl-" + uuid.uuid4().hex
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        trace = self.intake.start_trace(request, rid, "chat", body, messages, body.model)
        self._check_model_and_n(body)
        try:
            input_ids = self.intake.tokenize(trace, self.manager.apply_chat_template, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if body.max_tokens is not None and max_tokens != body.max_tokens:
            # max_completion_tokens wins, as in OpenAI's API; the older max_tokens is still checked, not ignored.
            self.intake.validated(rid, input_ids, body.sampling_dict(body.max_tokens), body, trace, OPENAI_NAMES)
        return await self._answer(body, request, rid, input_ids, max_tokens, trace)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        rid = "cmpl-" + uuid.uuid4().hex
        trace = self.intake.start_trace(request, rid, "text_completion", body, body.prompt, body.model)
        self._check_model_and_n(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        input_ids = self.intake.tokenize(trace, self.manager.encode, prompt) if isinstance(prompt, str) else prompt
        return await self._answer(body, request, rid, input_ids, body.max_tokens, trace)

    def _check_model_and_n(self, body: SamplingFields) -> None:
        body.refuse_unsupported()
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")

    async def _answer(self, body: SamplingFields, request: Request, rid: str, input_ids: list[int],
                      max_tokens: int | None, trace: RequestTrace | None) -> Response:
        if max_tokens is None:  # as much as the context (and the KV cache) leaves, like OpenAI
            limits = self.manager.limits
            max_tokens = max(min(limits.context_length, limits.max_total_tokens) - len(input_ids), 1)
        validated = self.intake.validated(rid, input_ids, body.sampling_dict(max_tokens), body, trace, OPENAI_NAMES)
        chat = rid.startswith("chatcmpl-")
        outputs = self.manager.generate(validated, trace, "chat" if chat else "text_completion", body.model)
        fmt = OpenAIFormat(rid, self.model_name, chat, int(time.time()), validated.sampling.logprobs)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return sse(fmt.stream(outputs, usage), outputs, trace)
        return json_answer(fmt.response(await last_output(outputs, request)), trace)


class OpenAIFormat:
    """Shapes outputs as OpenAI chat.completion(.chunk) or text_completion objects."""

    def __init__(self, rid: str, model: str, chat: bool, created: int, logprobs: bool = False):
        self.chat, self.logprobs = chat, logprobs  # logprobs: whether the request asked for them
        self.text_offset = 0  # completions: where the next token's text starts in the whole text
        self.header = {"id": rid, "created": created, "model": model}

    def response(self, out: RequestOutput) -> ChatCompletion | TextCompletion:
        reason, logprobs = finish_reason(out), self.logprobs_of(out)
        if self.chat:
            choice = ChatChoice(index=0, message=AssistantMessage(role="assistant", content=out.result.text),
                                logprobs=logprobs, finish_reason=reason)
            return ChatCompletion(**self.header, object="chat.completion", choices=[choice], usage=usage(out))
        choice = CompletionChoice(index=0, text=out.result.text, finish_reason=reason, logprobs=logprobs)
        return TextCompletion(**self.header, object="text_completion", choices=[choice], usage=usage(out))

    def chunk(self, text: str | None, reason: str | None, first: bool = False,
              logprobs: BaseModel | None = None) -> ChatCompletionChunk | TextCompletionChunk:
        if self.chat:
            delta = ChatDelta(role="assistant", content="") if first else (
                ChatDelta(content=text or "") if text or logprobs else ChatDelta())
            choice = ChatChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=reason)
            return ChatCompletionChunk(**self.header, object="chat.completion.chunk", choices=[choice])
        choice = CompletionChunkChoice(index=0, text=text or "", finish_reason=reason, logprobs=logprobs)
        return TextCompletionChunk(**self.header, object="text_completion", choices=[choice])

    def usage_chunk(self, out: RequestOutput) -> ChatCompletionChunk | TextCompletionChunk:
        if self.chat:
            return ChatCompletionChunk(**self.header, object="chat.completion.chunk", choices=[], usage=usage(out))
        return TextCompletionChunk(**self.header, object="text_completion", choices=[], usage=usage(out))

    def logprobs_of(self, out: RequestOutput) -> ChatLogprobs | CompletionLogprobs | None:
        """The `logprobs` of a choice for the tokens of `out`, in OpenAI's shape; None if not asked."""
        if not self.logprobs:
            return None
        logprobs, texts = out.logprobs or [], out.token_texts or {}
        if self.chat:
            return chat_logprobs(logprobs, texts)
        shaped = completion_logprobs(logprobs, texts, self.text_offset)
        self.text_offset += sum(len(token) for token in shaped.tokens)
        return shaped

    async def stream(self, outputs: AsyncIterator[RequestOutput], include_usage: bool) -> AsyncIterator[BaseModel]:
        """A chunk per output with new text (or, when asked, new tokens' logprobs: text held back
        as the possible start of a stop string comes in a later chunk than its tokens')."""
        if self.chat:
            yield self.chunk(None, None, first=True)
        async for out in outputs:
            raise_if_failed(out)
            logprobs = self.logprobs_of(out) if out.logprobs else None
            if out.text_delta or logprobs:
                yield self.chunk(out.text_delta, None, logprobs=logprobs)
            if out.result is None:
                continue
            yield self.chunk(None, finish_reason(out))
            if include_usage:
                yield self.usage_chunk(out)


def chat_logprobs(logprobs: list[TokenLogprob], texts: dict[int, str]) -> ChatLogprobs:
    """A chat choice's `logprobs`: each token's text, logprob, UTF-8 bytes and top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        text = texts[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return ChatLogprobs(content=[
        ChatTokenLogprob(**entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(*top)) for top in lp.top])
        for lp in logprobs])


def completion_logprobs(logprobs: list[TokenLogprob], texts: dict[int, str], text_offset: int) -> CompletionLogprobs:
    """A completion choice's `logprobs`, the legacy API's shape: parallel lists of the tokens'
    texts, logprobs, {text: logprob} of the top tokens and the chosen one, and where each
    token's text starts (counting from `text_offset`)."""
    tokens = [texts[lp.token_id] for lp in logprobs]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=text_offset)) if tokens else []
    top = [{texts[token]: value for token, value in lp.top} | {texts[lp.token_id]: lp.logprob} for lp in logprobs]
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs], top_logprobs=top,
                              text_offset=offsets)


def usage(out: RequestOutput) -> Usage:
    return Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                 total_tokens=out.prompt_tokens + out.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=out.cached_tokens))


def finish_reason(out: RequestOutput) -> str:
    return "length" if out.result.finish_reason == "length" else "stop"
