"""Which spans each process records for a request, and when (SPEC §5.1–5.4).

    Req {rid}                                    root, main process (every level)
    ├── Tokenizer (host | pid)                   level 2+: tokenize, dispatch
    ├── DP Controller (host | pid)               level 2+: dispatch (with --dp-size > 1)
    ├── Scheduler [TP 0] (host | pid)            level 2+: queue, prefill, decode
    │     prefill > prefill_chunk, decode > decode_step              level 3
    └── Detokenizer (host | pid)                 level 2+: detokenize

Each process has one tracer, from `open_tracer`; the serving code calls its named hooks at
a few points and it turns timestamps into `Recorder` records. When tracing is off the
tracer is None and every call site is one `if`. A request's level is fixed when it enters
and travels with its context, as does the trace decision made at the door.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TypeVar

from loupe.core import FinishReason, Outcome, TokenizedRequest, TraceContext, TraceDecision
from loupe.tracing.context import start_context
from loupe.tracing.ids import new_span_id, new_trace_id
from loupe.tracing.recorder import SERVER, Recorder, SpanRecord
from loupe.tracing.sampling import TraceControl

MILESTONES = (1, 10, 100, 1000, 10000)
NOT_RECORDED = "(not recorded: --trace-include-content records prompts and completions)"
CONTENT_NOT_RECORDED = {"input.value": NOT_RECORDED, "output.value": NOT_RECORDED}
T = TypeVar("T", bound="ProcessTracer")


def now() -> int:
    return time.perf_counter_ns()


class ProcessTracer:
    """What every process's tracer has: the recorder, which names the process's thread spans."""

    label = ""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def maybe_flush(self) -> None:
        """Send what is recorded if enough has waited; call when idle, too."""
        self.recorder.maybe_flush()

    def flush(self) -> None:
        """Send everything now (at shutdown)."""
        self.recorder.flush()


def open_tracer(kind: type[T], enabled: bool, address: str, ranks=None, **options) -> T | None:
    """This process's one tracer (None when tracing is off). `ranks` (a distributed Ranks)
    name its thread spans: `Scheduler [TP 1] (host | pid)`."""
    if not enabled:
        return None
    labels, attributes = (ranks.labels(), ranks.attributes()) if ranks is not None else (None, None)
    return kind(Recorder(address, kind.label, labels, attributes), **options)


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

    @property
    def recording(self) -> bool:
        """Whether the request's spans are recorded (sampled, or held for tail keeping); an
        unsampled request's trace only answers with its traceparent."""
        return self.ctx.decision != TraceDecision.OFF

    @property
    def carrier(self) -> TraceContext | None:
        """What the other processes get: nothing when the request is not recorded."""
        return self.ctx if self.recording else None


class RequestTracer(ProcessTracer):
    label = "Tokenizer"

    def __init__(self, recorder: Recorder, control: TraceControl, include_content: bool, own_spans: bool = True):
        super().__init__(recorder)
        self.control, self.include_content = control, include_content
        self.own_spans = own_spans  # --trace-modules has `request`: its thread span, tokenize, dispatch
        self.offset = recorder.offset_ns

    def start(self, rid: str, traceparent: str | None, tracestate: str | None, attributes: dict,
              prompt: str | list | None = None, wanted: bool | None = None) -> RequestTrace:
        """A new request's trace, decided now (`wanted`: the request's own choice, if it made
        one); an unsampled one records nothing, but still answers with a traceparent."""
        control = self.control
        ctx = start_context(control.level, traceparent, tracestate,
                            lambda trace_id, flags: control.decide(trace_id, flags, wanted))
        trace = RequestTrace(ctx, rid)
        trace.attributes.update({"rid": rid, "gen_ai.request.id": rid, "gen_ai.response.id": rid,
                                 "gen_ai.provider.name": "loupe", **attributes})
        if self.include_content and prompt is not None:
            text = prompt if isinstance(prompt, str) else json.dumps(prompt)
            trace.attributes.update({"gen_ai.prompt": text, "input.value": text, "input.mime_type": "text/plain"
                                     if isinstance(prompt, str) else "application/json",
                                     "gen_ai.input.messages": json.dumps(input_messages(prompt))})
        elif not self.include_content:  # else Phoenix shows an input and output made up of other attributes
            trace.attributes.update(CONTENT_NOT_RECORDED)
        return trace

    def dispatched(self, trace: RequestTrace, request: TokenizedRequest, start: int) -> None:
        trace.mark("dispatch", start)
        sampling = request.sampling
        trace.attributes.update({  # the values in effect, defaults included
            "gen_ai.request.max_tokens": sampling.max_new_tokens, "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p, "gen_ai.request.top_k": sampling.top_k,
        })

    def received(self, trace: RequestTrace, out) -> None:
        """An output of the request reached the main process."""
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
            self.finish(trace, None, Outcome.CANCELLED, "client_disconnected", "the client went away")
        else:
            result = out.result
            outcome = Outcome.of_result(result.finish_reason, result.error)
            if outcome == Outcome.FAILED:
                self.finish(trace, out, outcome, result.error_code, result.error)
            elif outcome == Outcome.CANCELLED:
                self.finish(trace, out, outcome, "aborted", "the request was aborted")
            else:
                self.finish(trace, out, outcome)

    def finish(self, trace: RequestTrace, out, outcome: Outcome, reason: str | None = None,
               message: str | None = None) -> None:
        """Record the root (and, from level 2, the tokenizer's spans) of a request that ended
        with `outcome`: `reason` is the error's type (`error.type`; a cancellation's, the
        `cancelled` event's), `message` what was said. Its status is ERROR only when it
        failed or found no room; a cancellation or a client's 4xx leaves it unset."""
        if trace.finished:
            return
        trace.finished = True
        if not trace.recording:
            return
        end = now()
        ctx, attrs, rec = trace.ctx, trace.attributes, self.recorder
        events = list(trace.events)
        result = out.result if out is not None else None
        if result is not None:
            attrs.update(usage_attributes(out))
            attrs["gen_ai.response.finish_reasons"] = [result.finish_reason]
            attrs["gen_ai.latency.time_in_queue"] = seconds(trace.queue_seconds)
            attrs["gen_ai.latency.time_in_model_prefill"] = seconds(result.prefill_seconds)
            attrs["gen_ai.latency.time_in_model_decode"] = seconds(result.decode_seconds)
            events.extend((name, wall - self.offset, a) for name, wall, a in result.events)
        attrs["loupe.request.outcome"] = outcome.value
        if trace.first_token is not None:
            attrs["gen_ai.latency.time_to_first_token"] = seconds((trace.first_token - trace.start) / 1e9)
        attrs["gen_ai.latency.e2e"] = seconds((end - trace.start) / 1e9)
        if self.include_content:
            text = result.text if result is not None and result.text is not None else "".join(trace.text)
            message = {"role": "assistant", "parts": [{"type": "text", "content": text}],
                       "finish_reason": result.finish_reason if result is not None else "error"}
            attrs.update({"gen_ai.completion": text, "output.value": text, "output.mime_type": "text/plain",
                          "gen_ai.output.messages": json.dumps([message])})
        if outcome == Outcome.CANCELLED:
            events.append(("cancelled", end, {"reason": reason or "aborted", "message": message or ""}))
        elif reason:
            attrs["error.type"] = reason
            events.append(("exception", end, {"exception.type": reason, "exception.message": message or ""}))
        events.sort(key=lambda e: e[1])
        rec.span(SpanRecord(ctx.trace_id, ctx.root_span_id, ctx.remote_parent_id, f"Req {trace.rid}", trace.start,
                            end, attrs, events, (message or reason) if outcome.is_error else None, SERVER,
                            ctx.tracestate, ctx.remote_parent_id is not None))
        if ctx.decision == TraceDecision.UNDECIDED:
            rec.settle(ctx.trace_id, self.control.verdict(outcome, (end - trace.start) / 1e9))
        if ctx.level >= 2 and self.own_spans:
            thread_id = new_span_id()
            rec.thread_span(ctx, thread_id, trace.start, end)
            for name, start, stop, slice_attrs in trace.slices:
                rec.slice(ctx, thread_id, name, start, stop, slice_attrs)
        rec.maybe_flush()


def seconds(value: float | None) -> float | None:
    """A duration in seconds as people read it: to the microsecond."""
    return None if value is None else round(value, 6)


def input_messages(prompt: str | list) -> list[dict]:
    """The prompt as OpenTelemetry GenAI input messages: a text, chat messages ({role, content})
    or token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return [{"role": m["role"], "parts": [{"type": "text", "content": m["content"]}]} for m in prompt]
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return [{"role": "user", "parts": [{"type": "text", "content": text}]}]


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

    __slots__ = ("ctx", "thread_id", "start", "stage", "stage_id", "stage_start", "stage_attrs", "handed_off",
                 "events", "steps")

    def __init__(self, ctx: TraceContext, start: int):
        self.ctx, self.thread_id, self.start = ctx, new_span_id(), start
        self.events: list = []  # `schedule` events, at level 3
        self.stage, self.stage_id, self.stage_start, self.stage_attrs = "queue", new_span_id(), start, {}
        self.handed_off: int | None = None  # prefill server: when it began waiting for its decode server
        # its decode stage's passes: [count, ns, those shared with prefill chunks, their ns, the chunks' tokens]
        self.steps = [0, 0, 0, 0, 0]


DECODE_COUNTS = ("steps", "step_seconds", "mixed_steps", "mixed_seconds", "mixed_prefill_tokens")


class SchedulerTracer(ProcessTracer):
    """Hooks on a scheduler's request (`req.trace`: its context, None when not traced): events
    for the root span in `req.events` at every level, open spans in `req.spans` from level 2.
    On a prefill server a request's `prefill` ends with `bootstrap` (waiting for the decode
    server's claim) and `kv_transfer`; on a decode server `queue` is followed by `bootstrap`
    (claimed, waiting for the KV, ending with `kv_receive`) and then `decode`."""

    label = "Scheduler"

    def __init__(self, recorder: Recorder, prefill_server: bool = False, backend: str = "tcp", handoff: bool = True):
        super().__init__(recorder)
        self.prefill_server = prefill_server  # requests from the router stop after their first token here
        self.backend = backend  # how KV moves, on a prefill or decode server
        self.handoff = handoff  # --trace-modules has `disaggregation`: bootstrap, kv_transfer, kv_receive

    def arrived(self, req, running: int, waiting: int) -> None:
        """`req` reached the scheduler with `running` requests running and `waiting` waiting
        (its `queue` span says so: the requests ahead of it)."""
        if req.trace is not None and req.trace.level >= 2:
            req.spans = SchedulerSpans(req.trace, now())
            req.spans.stage_attrs = {"running": running, "waiting": waiting}

    def admitted(self, req) -> None:
        """`req` joined the running batch: for the first time, or again after a retraction."""
        if req.trace is None:
            return
        if req.num_retractions == 0:
            at = time.time_ns()
            req.events.append(("queue.admitted", at, {"queue_seconds": seconds(req.admit_time - req.arrival_time)}))
            hit = "prefix_cache.hit" if req.cached_tokens else "prefix_cache.miss"
            req.events.append((hit, at, {"cached_tokens": req.cached_tokens, "prompt_tokens": len(req.prompt_ids)}))
        if req.spans is not None:
            self._next_stage(req.spans, "prefill", {"num_tokens": req.seq_len, "cached_tokens": req.kv_len})

    def forward(self, batch: list, num_new: list[int], start: int, end: int, batch_id: int,
                num_decoding: int) -> None:
        """One forward pass (`batch_id`: its number on this scheduler; the first `num_decoding`
        entries of `batch` are decodes, the rest prefill chunks). At level 3: a
        prefill_chunk span per chunk, a decode_step span per decoding request (with its step:
        the request's n-th decode), and a `schedule` event on each request's thread span
        saying what ran together; both say the KV tokens the pass attended (`kv_tokens`). From
        level 2, a decode stage counts its passes and those shared with prefill chunks (its
        DECODE_COUNTS attributes). Stage changes for requests that got their first token."""
        decodes, size, scheduled = [], len(batch), None
        prefill_tokens = sum(num_new[num_decoding:]) if num_decoding < size else 0
        for req, n in zip(batch, num_new, strict=True):
            spans = req.spans
            if spans is None:
                continue
            if spans.stage == "decode":
                counts = spans.steps
                counts[0] += 1
                counts[1] += end - start
                if prefill_tokens:
                    counts[2] += 1
                    counts[3] += end - start
                    counts[4] += prefill_tokens
            if spans.ctx.level >= 3:
                if scheduled is None:  # one event for the pass, shared as one tuple by its requests' traces
                    mode = "decode" if num_decoding == size else "prefill" if num_decoding == 0 else "mixed"
                    step = {"batch_id": batch_id, "batch_size": size, "kv_tokens": sum(r.kv_len for r in batch)}
                    scheduled = ("schedule", start, {**step, "mode": mode, "num_tokens": sum(num_new)})
                spans.events.append(scheduled)
                if spans.stage == "decode":
                    decodes.append((spans.ctx.trace_id, spans.stage_id, len(req.output_ids) - 1))
                    if spans.ctx.decision == TraceDecision.UNDECIDED:
                        self.recorder.undecided.add(spans.ctx.trace_id)
                else:
                    self.recorder.slice(spans.ctx, spans.stage_id, "prefill_chunk", start, end,
                                        {"num_tokens": n, "start_position": req.kv_len - n, "batch_id": batch_id,
                                         "batch_size": size})
            handing_off = self.prefill_server and req.bootstrap
            if spans.stage == "prefill" and req.output_ids and req.kv_len >= req.seq_len - 1 and not handing_off:
                self._next_stage(spans, "decode", {}, at=end)
        if decodes:
            self.recorder.fanout("decode_step", start, end, step, decodes)
        self.recorder.maybe_flush()

    def handed_off(self, req) -> None:
        """Prefill server: `req` has its first token and waits for its decode server's claim."""
        if req.spans is not None:
            req.spans.handed_off = now()

    def kv_sent(self, req) -> None:
        """Prefill server: `req`'s KV left for its decode server (or never will: `req.error`)."""
        spans = req.spans
        if spans is None or spans.handed_off is None or not self.handoff:
            return
        waited_until = req.kv_transfer[0] if req.kv_transfer else now()
        self.recorder.slice(spans.ctx, spans.stage_id, "bootstrap", spans.handed_off, waited_until,
                            {"bootstrap_room": req.bootstrap.room})
        if req.kv_transfer:
            self.recorder.slice(spans.ctx, spans.stage_id, "kv_transfer", *req.kv_transfer, self._kv_attributes(req))

    def kv_claimed(self, req) -> None:
        """Decode server: `req` holds pages, and its KV is asked of the prefill server."""
        if req.spans is not None:
            b = req.bootstrap
            self._next_stage(req.spans, "bootstrap", {"bootstrap_room": b.room, "prefill_server": f"{b.host}:{b.port}"})

    def kv_arrived(self, req) -> None:
        """Decode server: `req`'s KV and first token came; it decodes from the next step."""
        spans = req.spans
        if spans is None:
            return
        if self.handoff:
            self.recorder.slice(spans.ctx, spans.stage_id, "kv_receive", *req.kv_transfer, self._kv_attributes(req))
        self._next_stage(spans, "decode", {}, at=req.kv_transfer[1])

    def _kv_attributes(self, req) -> dict:
        return {"bytes": req.kv_bytes, "pages": len(req.kv.pages) if req.kv else 0, "num_tokens": len(req.prompt_ids),
                "backend": self.backend, "bootstrap_room": req.bootstrap.room}

    def retracted(self, req) -> None:
        if req.trace is None:
            return
        req.events.append(("retracted", time.time_ns(),
                           {"completion_tokens": len(req.output_ids), "retractions": req.num_retractions}))
        if req.spans is not None:
            self._next_stage(req.spans, "queue", {"retracted": True})

    def finished(self, req) -> None:
        """Close the request's spans (finished, aborted, or shut down)."""
        if req.trace is None:
            return
        aborted = req.finish_reason == FinishReason.ABORT and not req.error  # cancelled, not failed
        if aborted:
            req.events.append(("abort", time.time_ns(), {}))
        spans, req.spans = req.spans, None
        if spans is None:
            return
        end = now()
        if spans.stage == "decode":
            spans.stage_attrs["completion_tokens"] = len(req.output_ids)
        self._close_stage(spans, end)
        self.recorder.thread_span(spans.ctx, spans.thread_id, spans.start, end,
                                  {"finish_reason": req.finish_reason.value}, error=req.error or None,
                                  events=spans.events or None)

    def _next_stage(self, spans: SchedulerSpans, stage: str, attrs: dict, at: int | None = None) -> None:
        at = now() if at is None else at
        self._close_stage(spans, at)
        spans.stage, spans.stage_id, spans.stage_start, spans.stage_attrs = stage, new_span_id(), at, attrs

    def _close_stage(self, spans: SchedulerSpans, end: int) -> None:
        if spans.stage == "decode" and spans.steps[0]:
            counts = spans.steps
            spans.stage_attrs.update(zip(DECODE_COUNTS, (counts[0], seconds(counts[1] / 1e9), counts[2],
                                                         seconds(counts[3] / 1e9), counts[4]), strict=True))
            spans.steps = [0, 0, 0, 0, 0]
        self.recorder.slice(spans.ctx, spans.thread_id, spans.stage, spans.stage_start, end,
                            spans.stage_attrs or None, span_id=spans.stage_id)


# ---- detokenizer process -------------------------------------------------------------------


class DetokenizerSpans:
    __slots__ = ("ctx", "start", "num_tokens")

    def __init__(self, ctx: TraceContext, start: int):
        self.ctx, self.start, self.num_tokens = ctx, start, 0


class DetokenizerTracer(ProcessTracer):
    label = "Detokenizer"

    @staticmethod
    def started(ctx: TraceContext | None, start: int) -> DetokenizerSpans | None:
        """The state of a request's first output here; None when it records nothing here."""
        return DetokenizerSpans(ctx, start) if ctx is not None and ctx.level >= 2 else None

    def converted(self, spans: DetokenizerSpans, end: int, num_tokens: int, busy_seconds: float | None) -> None:
        """`busy_seconds`: the request's detokenize time (RequestResult.detokenize_seconds), on its last output."""
        spans.num_tokens += num_tokens
        if busy_seconds is None:
            return
        thread_id = new_span_id()
        self.recorder.thread_span(spans.ctx, thread_id, spans.start, end)
        self.recorder.slice(spans.ctx, thread_id, "detokenize", spans.start, end,
                            {"num_tokens": spans.num_tokens, "busy_seconds": seconds(busy_seconds)})


# ---- DP controller process -----------------------------------------------------------------


class DispatchTracer(ProcessTracer):
    label = "DP Controller"

    def dispatched(self, ctx: TraceContext | None, start: int, end: int, dp_rank: int) -> None:
        if ctx is None or ctx.level < 2:
            return
        thread_id = new_span_id()
        self.recorder.thread_span(ctx, thread_id, start, end)
        self.recorder.slice(ctx, thread_id, "dispatch", start, end, {"dp_rank": dp_rank})


# ---- the server's start ----------------------------------------------------------------------


@dataclass
class ChildStart:
    """One child process's start, as the supervisor saw it: spawned at `spawned`, ready at
    `ready` (None: it never was), with the phases it reported (process.Ready.phases); `failed`
    when it is what failed the start."""

    name: str
    pid: int | None
    spawned: int  # perf_counter_ns
    ready: int | None = None
    phases: list = field(default_factory=list)
    failed: bool = False


def record_startup(recorder: Recorder, started: int, children: list[ChildStart], attributes: dict,
                   error: str | None = None) -> int:
    """The server's start as one trace (tracing on): a root `loupe start` from `started` to now
    (ready, or failed), a span per child process from its spawn to its readiness with the
    phases it reported inside (load weights, size the KV cache, compile…), and on a failed
    start an `error` span naming the cause, the root then ERROR. Returns the trace id; the
    recorder sends the spans with its next flush."""
    trace_id, root_id, end = new_trace_id(), new_span_id(), now()
    for child in children:
        child_id = new_span_id()
        recorder.span(SpanRecord(trace_id, child_id, root_id, f"{child.name} process", child.spawned,
                                 child.ready or end, {"pid": child.pid, "ready": child.ready is not None}, None,
                                 error if child.failed else None))
        if child.phases:  # from the spawn to its first phase: a new interpreter, importing loupe and torch
            recorder.span(SpanRecord(trace_id, new_span_id(), child_id, "start the interpreter and import",
                                     child.spawned, child.phases[0][1]))
        for name, start, stop, phase_attributes in child.phases:
            recorder.span(SpanRecord(trace_id, new_span_id(), child_id, name, start, stop, phase_attributes or None))
    if error is not None:
        recorder.span(SpanRecord(trace_id, new_span_id(), root_id, "error", end, end, {"exception.message": error},
                                 None, error))
    recorder.span(SpanRecord(trace_id, root_id, None, "loupe start", started, end,
                             {**attributes, "loupe.start.seconds": seconds((end - started) / 1e9)}, None, error))
    return trace_id
