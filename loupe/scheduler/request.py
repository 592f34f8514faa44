"""A request as the scheduler sees it, and its sampling parameters."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field, fields

import torch


class InvalidRequest(ValueError):
    """A request that cannot run; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @classmethod
    def from_dict(cls, params: dict | None) -> SamplingParams:
        """Build and validate; a bad value raises InvalidRequest naming the parameter."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter {unknown[0]!r}", unknown[0])
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        params = {k: v for k, v in params.items() if v is not None}
        sp = cls(**params)
        sp.validate()
        return sp

    def validate(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise InvalidRequest(f"{name} must be {rule}, got {getattr(self, name)!r}", name)

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")
        check(is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k", "-1 or an integer >= 1")
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed", "an integer in [0, 2**63)")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
              "stop", "a non-empty string or a list of them")
        check(isinstance(self.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "a list of token ids")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class RequestLimits:
    """What a request must fit in; known to the tokenizer manager so it can refuse early."""

    vocab_size: int
    context_length: int
    max_total_tokens: int

    def check(self, input_ids: list[int], sampling: SamplingParams) -> None:
        """Raise ValueError (naming what is wrong) if the request cannot run."""
        if not input_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in input_ids):
            raise InvalidRequest(f"input_ids must be token ids in [0, {vocab})", "input_ids")
        n = len(input_ids)
        if n >= self.context_length:
            raise InvalidRequest(f"the prompt has {n} tokens; the context length is {self.context_length}", "prompt")
        if n + sampling.max_new_tokens > self.context_length:
            raise InvalidRequest(
                f"max_new_tokens={sampling.max_new_tokens} plus the prompt's {n} tokens "
                f"exceeds the context length {self.context_length}", "max_new_tokens"
            )
        if n + sampling.max_new_tokens > self.max_total_tokens:
            raise InvalidRequest(
                f"the prompt's {n} tokens plus max_new_tokens={sampling.max_new_tokens} "
                f"do not fit in the KV cache ({self.max_total_tokens} tokens)", "max_new_tokens"
            )


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Req:
    """One generation request. Token ids are `prompt_ids + output_ids`; the KV of the first
    `kv_len` of them is in the cache. The last token of a decoding request is its next input."""

    def __init__(self, rid: str, prompt_ids: list[int], sampling: SamplingParams, seed: int):
        self.rid = rid
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else seed)
        self.arrival_time = time.perf_counter()
        self.admit_time: float | None = None  # first admission
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        # KV state, owned by the scheduler (see scheduler/cache.py for the invariants).
        self.row: int | None = None
        self.pages: list[int] = []
        self.num_tree_pages = 0
        self.prefix_node = None
        self.kv_len = 0
        self.cached_tokens: int | None = None  # prompt tokens found in the prefix cache on admission
        self.num_retractions = 0
        self.finish_reason: FinishReason | None = None
        self.matched_stop: int | str | None = None
        self.sent_first_output = False
        # Tracing: the context from the tokenizer manager, open scheduler spans (level 2+),
        # and events for the root span. All None/empty when the request is not traced.
        self.trace = None
        self.spans = None
        self.events: list[tuple[str, int, dict]] = []

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

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

    def event(self, name: str, **attributes) -> None:
        if self.trace is not None:
            self.events.append((name, time.time_ns(), attributes))

    def __repr__(self) -> str:
        return f"Req({self.rid}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)}, kv={self.kv_len})"
