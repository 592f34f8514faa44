"""A request as the scheduler sees it."""

from __future__ import annotations

import time

import torch

from loupe.core import FinishReason, TokenizedRequest, TokenLogprob


class Req:
    """One generation request. Token ids are `prompt_ids + output_ids`; the KV of the first
    `kv_len` of them is in the cache. The last token of a decoding request is its next input."""

    def __init__(self, request: TokenizedRequest, seed: int):
        self.rid = request.rid
        self.prompt_ids = request.input_ids
        self.output_ids: list[int] = []
        self.output_logprobs: list[TokenLogprob] = []  # one per output token, when the request asked
        self.sampling = request.sampling
        self.generator = torch.Generator().manual_seed(self.sampling.seed if self.sampling.seed is not None else seed)
        self.arrival_time = time.perf_counter()
        self.admit_time: float | None = None  # first admission
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        # What it holds of the KV cache (a scheduler/cache.py KVHold, None while nothing): only
        # the KVManager sets it. The KV of the first `kv_len` tokens is computed.
        self.kv = None
        self.kv_len = 0
        self.cached_tokens: int | None = None  # prompt tokens found in the prefix cache on admission
        self.num_retractions = 0
        self.finish_reason: FinishReason | None = None
        self.matched_stop: int | str | None = None
        self.sent_first_output = False
        self.error: str | None = None  # why it failed (its KV never came, say)
        # Disaggregation: where its KV comes from or goes to, and how much moved.
        self.bootstrap = request.bootstrap
        self.kv_bytes = 0
        self.kv_transfer: tuple[int, int] | None = None  # perf_counter_ns when its KV began and ended moving
        # Tracing (tracing/spans.py SchedulerTracer): the context from the tokenizer manager,
        # open spans (level 2+), and events for the root span. None/empty when not traced.
        self.trace = request.trace
        self.spans = None
        self.events: list[tuple[str, int, dict]] = []

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def row(self) -> int | None:
        """Its row of the slot table, where the model finds its KV slots."""
        return self.kv.row if self.kv is not None else None

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def stage_seconds(self) -> tuple[float, float, float]:
        """(queue, prefill, decode) time, as far as the request got."""
        end = self.finish_time or time.perf_counter()
        admitted = self.admit_time or end
        first = self.first_token_time or end
        return admitted - self.arrival_time, first - admitted, end - first

    def __repr__(self) -> str:
        return f"Req({self.rid}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)}, kv={self.kv_len})"
