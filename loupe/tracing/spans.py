"""Which spans each process records for a request, and when (SPEC §5.1–5.4).

    Req {rid}                                    root, main process (every level)
    ├── Tokenizer (host | pid)                   level 2+: tokenize, dispatch
    ├── Scheduler [TP 0] (host | pid)            level 2+: queue, prefill, decode
    │     prefill > prefill_chunk, decode > decode_step              level 3
    └── Detokenizer (host | pid)                 level 2+: detokenize

Each process has one tracer; the serving code calls it at a few points and it turns
timestamps into `Recorder` tuples. When tracing is off the tracer is None and every call
site is one `if`. A request's level is fixed when it enters and travels with its context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loupe.tracing.context import TraceContext
from loupe.tracing.ids import new_span_id
from loupe.tracing.recorder import SERVER, Recorder

MILESTONES = (1, 10, 100, 1000, 10000)


def now() -> int:
    return time.perf_counter_ns()


# ---- main process: the root span and the tokenizer's own ------------------------------------


@dataclass
class RequestTrace:
    """A traced request in the main process, from arrival to the end of its response."""

    ctx: TraceContext
    rid: str
    start: int = field(default_factory=now)
    attributes: dict = field(default_factory=dict)
    events: list = field(default_factory=list)  # (name, perf_ns, attributes)
    slices: list = field(default_factory=list)  # (name, start, end, attributes)
    first_token: int | None = None
    tokens_seen: int = 0
    queue_seconds: float = 0.0
    text: list = field(default_factory=list)  # completion text so far, with --trace-include-content
    finished: bool = False

    def mark(self, name: str, start: int, attributes: dict | None = None) -> None:
        """A tokenizer-process slice from `start` until now."""
        self.slices.append((name, start, now(), attributes))


class TokenizerTracer:
    def __init__(self, recorder: Recorder, level: int, include_content: bool):
        self.recorder, self.level, self.include_content = recorder, level, include_content
        self.offset = recorder.offset_ns

    def start(self, rid: str, traceparent: str | None, tracestate: str | None, attributes: dict) -> RequestTrace:
        trace = RequestTrace(TraceContext.start(self.level, traceparent, tracestate), rid)
        trace.attributes.update({"rid": rid, "gen_ai.request.id": rid, **attributes})
        return trace

    def on_output(self, trace: RequestTrace, out) -> None:
        if out.queue_seconds is not None:  # on the first output only
            trace.queue_seconds = out.queue_seconds
        if self.include_content:
            trace.text.append(out.text_delta)
        if not out.token_ids:
            return
        if trace.first_token is None:
            trace.first_token = now()
        before, trace.tokens_seen = trace.tokens_seen, trace.tokens_seen + len(out.token_ids)
        for milestone in MILESTONES:
            if before < milestone <= trace.tokens_seen:
                name = "first_token" if milestone == 1 else "token_milestone"
                trace.events.append((name, now(), {"completion_tokens": milestone}))

    def finish_request(self, trace: RequestTrace, out) -> None:
        """End the trace of a request that reached the scheduler; `out` is its last output,
        or None when the client went away first."""
        if out is None:
            self.finish(trace, None, "client_disconnected", "the client went away")
        elif out.error:
            self.finish(trace, out, "invalid_request_error", out.error)
        else:
            self.finish(trace, out)

    def finish(self, trace: RequestTrace, out, error_type: str | None = None, error: str | None = None) -> None:
        """Record the root (and, from level 2, the tokenizer's spans) of a finished request."""
        if trace.finished:
            return
        trace.finished = True
        end = now()
        ctx, attrs, rec = trace.ctx, trace.attributes, self.recorder
        events = list(trace.events)
        if out is not None:
            attrs.update(usage_attributes(out))
            attrs["gen_ai.response.finish_reasons"] = [out.finish_reason or "abort"]
            attrs["gen_ai.latency.time_in_queue"] = trace.queue_seconds
            attrs["gen_ai.latency.time_in_model_prefill"] = out.prefill_seconds
            attrs["gen_ai.latency.time_in_model_decode"] = out.decode_seconds
            events.extend((name, wall - self.offset, a) for name, wall, a in out.events)
            if out.finish_reason == "abort" and error_type is None:
                error_type, error = "aborted", out.error or "the request was aborted"
        if trace.first_token is not None:
            attrs["gen_ai.latency.time_to_first_token"] = (trace.first_token - trace.start) / 1e9
        attrs["gen_ai.latency.e2e"] = (end - trace.start) / 1e9
        if self.include_content:
            attrs["gen_ai.completion"] = out.text if out is not None and out.text is not None else "".join(trace.text)
        if error_type:
            attrs["error.type"] = error_type
            events.append(("exception", end, {"exception.type": error_type, "exception.message": error or ""}))
        events.sort(key=lambda e: e[1])
        rec.span(ctx.trace_id, ctx.root_span_id, ctx.remote_parent_id, f"Req {trace.rid}", trace.start, end,
                 attrs, events, error if error_type else None, SERVER, ctx.tracestate, ctx.remote_parent_id is not None)
        if ctx.level >= 2:
            thread_id = new_span_id()
            rec.span(ctx.trace_id, thread_id, ctx.root_span_id, rec.thread_name, trace.start, end,
                     rec.thread_attributes, tracestate=ctx.tracestate)
            for name, start, stop, slice_attrs in trace.slices:
                rec.span(ctx.trace_id, new_span_id(), thread_id, name, start, stop, slice_attrs,
                         tracestate=ctx.tracestate)
        rec.maybe_flush()


def usage_attributes(out) -> dict:
    return {
        "gen_ai.usage.prompt_tokens": out.prompt_tokens,
        "gen_ai.usage.input_tokens": out.prompt_tokens,
        "gen_ai.usage.completion_tokens": out.completion_tokens,
        "gen_ai.usage.output_tokens": out.completion_tokens,
        "gen_ai.usage.cached_tokens": out.cached_tokens,
        "gen_ai.usage.cache_read.input_tokens": out.cached_tokens,
    }


# ---- scheduler process ---------------------------------------------------------------------


class SchedulerSpans:
    """Open spans of one request in the scheduler (level 2+)."""

    __slots__ = ("ctx", "thread_id", "start", "stage", "stage_id", "stage_start", "stage_attrs")

    def __init__(self, ctx: TraceContext, start: int):
        self.ctx, self.thread_id, self.start = ctx, new_span_id(), start
        self.stage, self.stage_id, self.stage_start, self.stage_attrs = "queue", new_span_id(), start, {}


class SchedulerTracer:
    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def on_arrival(self, req, ctx: TraceContext) -> None:
        if ctx.level >= 2:
            req.spans = SchedulerSpans(ctx, now())

    def on_admit(self, req) -> None:
        spans = req.spans
        if spans is not None:
            self._next_stage(spans, "prefill", {"num_tokens": req.seq_len, "cached_tokens": req.kv_len})

    def on_forward(self, batch: list, num_new: list[int], start: int, end: int) -> None:
        """One forward pass: a prefill_chunk span per chunk, one decode_step fan-out for the
        decodes (level 3); stage changes for requests that got their first token."""
        decodes = []
        size = len(batch)
        for req, n in zip(batch, num_new, strict=True):
            spans = req.spans
            if spans is None:
                continue
            if spans.stage == "decode":
                if spans.ctx.level >= 3:
                    decodes.append((spans.ctx.trace_id, spans.stage_id))
            elif spans.ctx.level >= 3:
                self.recorder.span(spans.ctx.trace_id, new_span_id(), spans.stage_id, "prefill_chunk", start, end,
                                   {"num_tokens": n, "start_position": req.kv_len - n, "batch_size": size},
                                   tracestate=spans.ctx.tracestate)
            if spans.stage == "prefill" and req.output_ids and req.kv_len >= req.seq_len - 1:
                self._next_stage(spans, "decode", {}, at=end)
        if decodes:
            self.recorder.fanout("decode_step", start, end, {"batch_size": size}, decodes)
        self.recorder.maybe_flush()

    def on_retract(self, req) -> None:
        if req.spans is not None:
            self._next_stage(req.spans, "queue", {"retracted": True})

    def on_finish(self, req) -> None:
        spans = req.spans
        if spans is None:
            return
        end = now()
        if spans.stage == "decode":
            spans.stage_attrs["completion_tokens"] = len(req.output_ids)
        self._close_stage(spans, end)
        rec, ctx = self.recorder, spans.ctx
        attrs = {**rec.thread_attributes, "finish_reason": req.finish_reason.value}
        rec.span(ctx.trace_id, spans.thread_id, ctx.root_span_id, rec.thread_name, spans.start, end, attrs,
                 error=f"aborted: {req.finish_reason.value}" if req.finish_reason == "abort" else None,
                 tracestate=ctx.tracestate)
        req.spans = None

    def _next_stage(self, spans: SchedulerSpans, stage: str, attrs: dict, at: int | None = None) -> None:
        at = now() if at is None else at
        self._close_stage(spans, at)
        spans.stage, spans.stage_id, spans.stage_start, spans.stage_attrs = stage, new_span_id(), at, attrs

    def _close_stage(self, spans: SchedulerSpans, end: int) -> None:
        ctx = spans.ctx
        self.recorder.span(ctx.trace_id, spans.stage_id, spans.thread_id, spans.stage, spans.stage_start, end,
                           spans.stage_attrs or None, tracestate=ctx.tracestate)


# ---- detokenizer process -------------------------------------------------------------------


class DetokenizerSpans:
    __slots__ = ("ctx", "start", "busy_ns", "num_tokens")

    def __init__(self, ctx: TraceContext, start: int):
        self.ctx, self.start, self.busy_ns, self.num_tokens = ctx, start, 0, 0


class DetokenizerTracer:
    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def on_convert(self, spans: DetokenizerSpans, start: int, end: int, num_tokens: int, finished: bool) -> None:
        spans.busy_ns += end - start
        spans.num_tokens += num_tokens
        if not finished:
            return
        rec, ctx = self.recorder, spans.ctx
        thread_id = new_span_id()
        rec.span(ctx.trace_id, thread_id, ctx.root_span_id, rec.thread_name, spans.start, end,
                 rec.thread_attributes, tracestate=ctx.tracestate)
        rec.span(ctx.trace_id, new_span_id(), thread_id, "detokenize", spans.start, end,
                 {"num_tokens": spans.num_tokens, "busy_seconds": spans.busy_ns / 1e9}, tracestate=ctx.tracestate)
