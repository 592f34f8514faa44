"""The native API's answer (SGLang's /generate shape), defined once: /generate builds it,
`loupe.Engine` returns it, and /openapi.json describes it from these models. Imports no web
framework, so the engine can use it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel

from loupe.core import TokenLogprob

# A token's logprob, its id, and its text (None unless return_text_in_logprobs).
LogprobTriple = tuple[float, int, str | None]


class GenerateMeta(BaseModel):
    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: Literal["stop", "length", "abort"] | None
    matched_stop: int | str | None
    output_token_logprobs: list[LogprobTriple] | None = None  # with return_logprob
    output_top_logprobs: list[list[LogprobTriple]] | None = None  # with top_logprobs_num > 0 too


class GenerateResponse(BaseModel):
    """/generate's answer, and each event of its stream (the text and ids so far)."""

    text: str
    output_ids: list[int]
    meta_info: GenerateMeta


def logprob_switches(return_logprob: bool, top_logprobs_num: int) -> dict:
    """The native API's top-level logprob fields as `core.SamplingParams` names them."""
    return {"logprobs": return_logprob, "top_logprobs": top_logprobs_num}


def generate_response(rid: str, text: str, output_ids: list[int], *, prompt_tokens: int, completion_tokens: int,
                      cached_tokens: int, finish_reason: str | None, matched_stop: int | str | None,
                      logprobs: list[TokenLogprob] | None = None, top: bool = False,
                      token_text: Callable[[int], str | None] = lambda token_id: None) -> GenerateResponse:
    """The answer; with `logprobs` (the request asked for them) `output_token_logprobs`, and with
    `top` `output_top_logprobs` too, each token's text from `token_text`."""
    meta = GenerateMeta(id=rid, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        cached_tokens=cached_tokens, finish_reason=finish_reason, matched_stop=matched_stop)
    if logprobs is not None:
        meta.output_token_logprobs = [(lp.logprob, lp.token_id, token_text(lp.token_id)) for lp in logprobs]
        if top:
            meta.output_top_logprobs = [[(value, token, token_text(token)) for token, value in lp.top]
                                        for lp in logprobs]
    return GenerateResponse(text=text, output_ids=output_ids, meta_info=meta)
