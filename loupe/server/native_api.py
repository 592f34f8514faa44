"""The native API, /generate (SGLang's): text or token ids in, the answer of `native.py`
out, whole or as a stream of the text and ids so far."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

from fastapi import Request, Response

from loupe.ipc import RequestOutput
from loupe.server.intake import Intake
from loupe.server.native import GenerateResponse, generate_response, logprob_switches
from loupe.server.protocol import APIError, GenerateRequest
from loupe.server.streaming import json_answer, last_output, raise_if_failed, sse


class NativeAPI:
    def __init__(self, intake: Intake):
        self.intake, self.manager = intake, intake.manager

    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        rid = body.rid or uuid.uuid4().hex
        prompt = body.text if body.text is not None else body.input_ids
        trace = self.intake.start_trace(request, rid, "generate", body, prompt)
        self._check(body, rid)
        params = {**body.sampling_params, **logprob_switches(body.return_logprob, body.top_logprobs_num)}
        input_ids = body.input_ids if body.text is None else self.intake.tokenize(trace, self.manager.encode, body.text)
        outputs = self.manager.generate(self.intake.validated(rid, input_ids, params, body, trace), trace, "generate")
        if body.stream:
            return sse(stream(rid, outputs, body), outputs, trace)
        final = await last_output(outputs, request)
        return json_answer(answer(rid, final.result.text, final, body), trace)

    def _check(self, body: GenerateRequest, rid: str) -> None:
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


def answer(rid: str, text: str, out: RequestOutput, body: GenerateRequest) -> GenerateResponse:
    """The answer so far: `out` holds every token id so far (and their logprobs and token texts,
    if asked), the counts, and how it ended."""
    token_text = (out.token_texts or {}).get if body.return_text_in_logprobs else lambda token_id: None
    ended, stop = (out.result.finish_reason, out.result.matched_stop) if out.result else (None, None)
    return generate_response(rid, text, out.token_ids, prompt_tokens=out.prompt_tokens,
                             completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens,
                             finish_reason=ended, matched_stop=stop,
                             logprobs=(out.logprobs or []) if body.return_logprob else None,
                             top=body.top_logprobs_num > 0, token_text=token_text)


async def stream(rid: str, outputs: AsyncIterator[RequestOutput], body: GenerateRequest
                 ) -> AsyncIterator[GenerateResponse]:
    """Each event holds the text, token ids and (if asked) logprobs so far, as other engines'
    native APIs do."""
    text, ids, logprobs, texts = "", [], [], {}
    async for out in outputs:
        raise_if_failed(out)
        ids.extend(out.token_ids)
        logprobs.extend(out.logprobs or [])
        texts.update(out.token_texts or {})
        text = out.result.text if out.result is not None else text + out.text_delta
        yield answer(rid, text, dataclasses.replace(out, token_ids=ids, logprobs=logprobs, token_texts=texts), body)
