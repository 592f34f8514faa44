"""The main process's side of generation: tokenize, send to the scheduler, gather the text back."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from loupe import ipc
from loupe.core import FinishReason, InvalidRequest, ModelInfo, Outcome, RequestLimits, TokenizedRequest, TraceDecision
from loupe.server.metrics import Metrics
from loupe.tracing.recorder import FLUSH_EVERY_NS
from loupe.tracing.spans import RequestTrace, RequestTracer, now

logger = logging.getLogger(__name__)
DRAIN_POLL_S = 0.05
DRAIN_ANSWER_S = 2.0  # for the error answers to leave


@dataclass
class RequestState:
    trace: RequestTrace | None = None
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    queue_seconds: float | None = None  # from the first output
    end: float | None = None  # when the last output arrived
    operation: str | None = None  # gen_ai.operation.name of a generation route's request (else not in gen_ai_*)
    model: str = ""  # the model it asked for

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def trace_id(self) -> str:
        """The id the response's traceparent carries (whether or not the trace is recorded); "-" untraced."""
        return f"{self.trace.ctx.trace_id:032x}" if self.trace is not None else "-"


class TokenizerManager:
    def __init__(self, endpoints: ipc.Endpoints, metrics: Metrics, tracer: RequestTracer | None,
                 log_requests: bool = False):
        self.metrics = metrics
        self.log_requests = log_requests
        ctx = zmq.asyncio.Context()
        self.to_scheduler = ipc.connect(ctx, zmq.PUSH, endpoints.scheduler)
        self.inbox = ipc.bind(ctx, zmq.PULL, endpoints.manager)
        self.states: dict[str, RequestState] = {}
        metrics.open_requests.set_function(lambda: len(self.states))
        self.tokenizer = None
        self.limits: RequestLimits | None = None
        self.model_info: dict = {}
        self.max_prompt_chars = 0  # set with the tokenizer
        self.loop: asyncio.AbstractEventLoop | None = None  # the HTTP server's, once it runs
        self.draining = False  # SIGTERM: no new requests, the running ones finish
        self.ready = False
        self.tracer = tracer

    def set_ready(self, tokenizer, model: ModelInfo) -> None:
        self.tokenizer, self.limits, self.model_info = tokenizer, model.limits, model.as_dict()
        self.max_prompt_chars = model.limits.context_length * longest_token(tokenizer)
        self.ready = True

    # ---- tokenization ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        self._check_size(len(text), "prompt")
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        self._check_size(sum(len(m["content"]) for m in messages), "messages")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def _check_size(self, num_chars: int, param: str) -> None:
        """Refuse a text too long to fit the context before tokenizing it: no token covers
        more than `longest_token` characters, so it needs at least chars / that many tokens."""
        if num_chars > self.max_prompt_chars:
            raise InvalidRequest(f"the {param} has {num_chars} characters: more than a context of "
                                 f"{self.limits.context_length} tokens can hold", param)

    # ---- generation -----------------------------------------------------------------------

    async def generate(self, request: TokenizedRequest, trace: RequestTrace | None = None,
                       operation: str | None = None, model: str = "") -> AsyncIterator[ipc.RequestOutput]:
        """Yield the request's outputs until it finishes. Closing the iterator early aborts it
        (and ends its trace, if it has one). A generation route's request names its
        `operation` (and the `model` it asked for) for the GenAI server metrics."""
        rid = request.rid
        if rid in self.states:
            raise ValueError(f"request id {rid!r} is already in use")
        state = self.states[rid] = RequestState(trace, operation=operation, model=model)
        dispatched = now()
        ipc.send(self.to_scheduler, request)
        recording = trace is not None and trace.recording  # an unsampled request costs this branch
        if recording:
            self.tracer.dispatched(trace, request, dispatched)
        out = None
        try:
            while True:
                out = await state.outputs.get()
                if recording:
                    self.tracer.received(trace, out)
                yield out
                if out.result is not None:
                    return
        finally:
            if not state.finished:
                ipc.send(self.to_scheduler, ipc.AbortRequest(rid))
                # Its last output will be dropped by run_inbox (the state is gone): count it here.
                self.metrics.requests.labels(status="abort").inc()
                self.metrics.outcomes.labels(outcome=Outcome.CANCELLED).inc()
            self.states.pop(rid, None)
            if self.log_requests:
                log_request(request, state, out)
            if recording:
                self.tracer.finish_request(trace, out if state.finished else None)

    def fail_all(self, message: str) -> None:
        """Answer every request in flight with an error (a serving process died: nothing else
        will answer them). Call on the event loop's thread."""
        self._deliver(ipc.TextBatch([
            ipc.RequestOutput(rid, [], result=ipc.RequestResult(FinishReason.ABORT, error=message,
                                                                error_code="engine_unavailable"))
            for rid, state in self.states.items() if not state.finished]))

    async def drain(self, timeout: float) -> None:
        """Refuse new requests and wait up to `timeout` seconds for the running ones to end;
        answer those still running with an error."""
        self.draining = True
        logger.info("draining: %d requests running, new ones refused; waiting up to %g s (a second Ctrl-C or "
                    "SIGTERM stops without waiting)", len(self.states), timeout)
        deadline = self.loop.time() + timeout
        while self.states and self.loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.states:
            logger.warning("%d requests still running after %g s; answering them with an error",
                           len(self.states), timeout)
            self.fail_all(f"the server is shutting down and the request did not finish within {timeout:g} s")
            while self.states and self.loop.time() < deadline + DRAIN_ANSWER_S:
                await asyncio.sleep(DRAIN_POLL_S)

    async def flush_spans_periodically(self) -> None:
        while self.tracer is not None:
            await asyncio.sleep(FLUSH_EVERY_NS / 1e9)
            self.tracer.maybe_flush()

    async def run_inbox(self) -> None:
        """Route the detokenizer's text and the other processes' stats; runs for the server's life."""
        self.loop = asyncio.get_running_loop()
        dispatch = ipc.Dispatch({ipc.TextBatch: self._deliver, ipc.SchedulerStats: self.metrics.set_scheduler_stats,
                                 ipc.ExporterStats: self.metrics.set_exporter_stats,
                                 ipc.MetricsExported: self.metrics.metrics_exported})
        while True:
            dispatch(ipc.decode(await self.inbox.recv()))

    def _deliver(self, batch: ipc.TextBatch) -> None:
        """Hand each output to the route waiting for it."""
        now = time.perf_counter()
        for out in batch.outputs:
            state = self.states.get(out.rid)
            if state is None:  # the client left and its abort crossed this output
                continue
            self._observe(state, out, now)
            state.outputs.put_nowait(out)

    def _observe(self, state: RequestState, out: ipc.RequestOutput, now: float) -> None:
        m = self.metrics
        if out.queue_seconds is not None:
            state.queue_seconds = out.queue_seconds
            m.queue_time.observe(out.queue_seconds, self._exemplar(state))
        if out.token_ids:
            m.generation_tokens.inc(len(out.token_ids))
            if state.first_token_time is None:
                state.first_token_time = now
                m.time_to_first_token.observe(now - state.created, self._exemplar(state))
                m.prompt_tokens.inc(out.prompt_tokens)
        result = out.result
        if result is None:
            return
        if result.kv_bytes:
            m.kv_transfers.inc()
            m.kv_transfer_bytes.inc(result.kv_bytes)
            m.kv_transfer_seconds.observe(result.kv_seconds)
        if result.error and result.error_code == "kv_transfer_failed":
            m.kv_transfer_failures.inc()
        state.end = now
        outcome = Outcome.of_result(result.finish_reason, result.error)
        exemplar = self._exemplar(state, outcome, now)
        m.e2e_latency.observe(now - state.created, exemplar)
        m.prefill_time.observe(result.prefill_seconds, exemplar)
        m.decode_time.observe(result.decode_seconds, exemplar)
        if result.detokenize_seconds is not None:
            m.detokenize_time.observe(result.detokenize_seconds, exemplar)
        m.requests.labels(status=status(result)).inc()
        m.outcomes.labels(outcome=outcome).inc()
        if state.operation is not None and outcome != Outcome.CANCELLED:  # a cancelled request is not timed
            ttft = state.first_token_time - state.created if state.first_token_time is not None else None
            m.observe_genai(state.operation, state.model, now - state.created, ttft, out.completion_tokens,
                            result.error_code if result.error else None, exemplar)

    def _exemplar(self, state: RequestState, outcome: Outcome | None = None, now: float = 0.0) -> dict | None:
        """The latency histograms' exemplar: the trace id, when the trace will be exported. An
        undecided trace's only once it ended (with `outcome`), if a tail rule will keep it (its
        root ends a little later, so it is at least this slow; one that fails only then gets none)."""
        trace = state.trace
        decision = trace.ctx.decision if trace is not None else TraceDecision.OFF
        kept = decision == TraceDecision.SAMPLED or (
            decision == TraceDecision.UNDECIDED and outcome is not None
            and self.tracer.control.verdict(outcome, now - trace.start / 1e9))
        return {"trace_id": state.trace_id} if kept else None


def longest_token(tokenizer) -> int:
    """Characters in the tokenizer's longest token (byte-level tokens count bytes, which is
    at least as many as characters)."""
    vocab = tokenizer.get_vocab()
    return max((len(token) for token in vocab), default=1) or 1


def status(result: ipc.RequestResult) -> str:
    """How a request that reached the scheduler ended: stop, length, abort or error."""
    return "error" if result.error else result.finish_reason


def log_request(request: TokenizedRequest, state: RequestState, out: ipc.RequestOutput | None) -> None:
    """The --log-requests line of a request that reached the scheduler; `out` is the last
    output it got. One whose client left first ended in `abort`, the stages it never finished "-"."""
    last = out.result if state.finished else None
    rid = request.rid
    fields = {
        "rid": rid if rid.isprintable() and " " not in rid else json.dumps(rid),  # one line, one field
        "trace_id": state.trace_id,
        "status": status(last) if last else "abort",
        "prompt_tokens": len(request.input_ids),
        "completion_tokens": out.completion_tokens if out else 0,
        "cached_tokens": out.cached_tokens if out else 0,
        "e2e_ms": ms((state.end or time.perf_counter()) - state.created),
        "ttft_ms": ms(state.first_token_time and state.first_token_time - state.created),
        "queue_ms": ms(state.queue_seconds),
        "prefill_ms": ms(last and last.prefill_seconds),
        "decode_ms": ms(last and last.decode_seconds),
        "detokenize_ms": ms(last and last.detokenize_seconds),
    }
    logger.info("request %s", " ".join(f"{key}={value}" for key, value in fields.items()))


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"
