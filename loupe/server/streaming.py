"""How an answer leaves: whole (`last_output`, aborting the request if the client goes away
meanwhile) or as server-sent events (`sse`), and what a failed request answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from loupe.ipc import RequestOutput
from loupe.server.protocol import APIError
from loupe.tracing.spans import RequestTrace

DISCONNECT_POLL_SECONDS = 0.5


class ClientDisconnected(Exception):
    pass


def raise_if_failed(out: RequestOutput) -> None:
    """A request that failed in the engine: its KV never came from the prefill server (502),
    or a serving process died (503)."""
    result = out.result
    if result is not None and result.error:
        raise APIError(503 if result.error_code == "engine_unavailable" else 502, result.error, code=result.error_code,
                       ran=True)


def trace_headers(trace: RequestTrace | None) -> dict | None:
    """The response names the request's root span, so a client can find its trace."""
    return {"traceparent": trace.ctx.traceparent} if trace is not None else None


def json_answer(answer: BaseModel, trace: RequestTrace | None = None) -> Response:
    """An answer's model as JSON; fields it never set (a chunk's usage, say) are left out."""
    return Response(answer.model_dump_json(exclude_unset=True), media_type="application/json",
                    headers=trace_headers(trace))


async def last_output(outputs: AsyncIterator[RequestOutput], request: Request) -> RequestOutput:
    """Run a request to its end and return its last output, holding all its tokens (and their
    logprobs); abort it if the client goes away meanwhile."""

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


def sse(events: AsyncIterator[BaseModel], outputs: AsyncIterator[RequestOutput],
        trace: RequestTrace | None) -> StreamingResponse:
    """Server-sent events, each an answer's model as JSON. If the client leaves, the stream is
    cancelled and closing `outputs` aborts the request."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield b"data: " + event.model_dump_json(exclude_unset=True).encode() + b"\n\n"
        except APIError as e:  # the status line is sent already: the error is an event, in OpenAI's shape
            yield b"data: " + e.answer().model_dump_json().encode() + b"\n\n"
        finally:
            await events.aclose()
            await outputs.aclose()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=trace_headers(trace))
