"""The per-process span recorder: cheap records on the serving path, shipped in batches.

Serving processes never build OpenTelemetry objects. A finished span is one named tuple
(`SpanRecord`, or a `Fanout` for a slice shared by a batch) appended to a list; `flush()`
pickles the list to the exporter process over ZMQ without blocking. If the exporter cannot
keep up, the batch is dropped and counted, never waited for.
Times are `perf_counter_ns()`; the batch carries this process's offset to epoch time.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import NamedTuple

import zmq

from loupe import ipc
from loupe.core import TraceContext, TraceDecision
from loupe.tracing.ids import new_span_id

SERVER, INTERNAL = 2, 1  # OpenTelemetry SpanKind values
# Few, larger messages: each one wakes threads in the sender and in the exporter, and on
# a busy machine every wake-up is taken from the model's threads.
FLUSH_EVERY_NS = 250_000_000
FLUSH_AT_SPANS = 512  # a fan-out counts one per request
SEND_HIGH_WATER_MARK = 256  # batches queued towards the exporter before new ones are dropped


class SpanRecord(NamedTuple):
    trace_id: int
    span_id: int
    parent_id: int | None
    name: str
    start: int  # perf_counter_ns
    end: int
    attributes: dict | None = None
    events: list | None = None  # (name, perf_ns, attributes)
    error: str | None = None  # the status message of a failed span
    kind: int = INTERNAL
    tracestate: str | None = None
    remote_parent: bool = False  # the parent is the caller's span, in another service


class Fanout(NamedTuple):
    """The same slice (say, one decode step) under each of `parents`, (trace_id, parent span
    id, step) triples (the step: the request's own count of such slices, or None): recorded
    once, turned into one span per request by the exporter."""

    name: str
    start: int
    end: int
    attributes: dict
    parents: list[tuple[int, int, int | None]]


def host_id() -> str:
    """8 hex digits naming this machine: from /etc/machine-id, else the MAC address."""
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()
        if len(machine) >= 8:
            return machine[:8]
    except OSError:
        pass
    return f"{uuid.getnode() & 0xFFFFFFFF:08x}"


def epoch_offset_ns(samples: int = 20) -> int:
    """What turns this process's perf_counter_ns() into epoch ns: read from the tightest of a few
    paired readings, since a process descheduled between the two clocks' reads (a loaded
    machine, a server starting) would shift all its spans against its peers' by that pause."""
    best = None
    for _ in range(samples):
        before, wall, after = time.perf_counter_ns(), time.time_ns(), time.perf_counter_ns()
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    return best[1]


class Recorder:
    def __init__(self, address: str, label: str, ranks: dict[str, int] | None = None,
                 rank_attributes: dict[str, int] | None = None):
        """`ranks` name the thread span (`{"TP": 0}` -> "[TP 0]"); `rank_attributes` default to
        them (`tp_rank`), and may list more (a scheduler has all three, named or not)."""
        ranks, host, pid = ranks or {}, host_id(), os.getpid()
        rank_text = "".join(f" [{k} {v}]" for k, v in ranks.items())
        self.thread_name = f"{label}{rank_text} (host:{host} | pid:{pid})"
        if rank_attributes is None:
            rank_attributes = {f"{k.lower()}_rank": v for k, v in ranks.items()}
        self.thread_attributes = {"thread_label": label, "host_id": host, "pid": pid, **rank_attributes}
        self.offset_ns = epoch_offset_ns()
        self.spans: list[tuple] = []
        self.fanouts: list[tuple] = []
        self.fanout_spans = 0
        self.undecided: set[int] = set()  # traces in this batch that tail keeping may still discard
        self.verdicts: list[tuple[int, str | None]] = []
        self.dropped = 0
        self.last_flush = time.perf_counter_ns()
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
        self.sock.setsockopt(zmq.LINGER, 2000)  # at exit, give queued batches 2 s to leave
        self.sock.connect(address)

    def span(self, record: SpanRecord) -> None:
        self.spans.append(record)

    def thread_span(self, ctx: TraceContext, span_id: int, start: int, end: int, attributes: dict | None = None,
                    error: str | None = None, events: list | None = None) -> None:
        """This process's span under a request's root: its name and attributes say which process."""
        attrs = {**self.thread_attributes, **attributes} if attributes else self.thread_attributes
        if ctx.decision == TraceDecision.UNDECIDED:
            self.undecided.add(ctx.trace_id)
        self.spans.append(SpanRecord(ctx.trace_id, span_id, ctx.root_span_id, self.thread_name, start, end, attrs,
                                     events, error, INTERNAL, ctx.tracestate))

    def slice(self, ctx: TraceContext, parent_id: int, name: str, start: int, end: int,
              attributes: dict | None = None, span_id: int | None = None) -> None:
        """A stage or operation of a request under one of this process's spans."""
        if ctx.decision == TraceDecision.UNDECIDED:
            self.undecided.add(ctx.trace_id)
        self.spans.append(SpanRecord(ctx.trace_id, span_id or new_span_id(), parent_id, name, start, end,
                                     attributes, None, None, INTERNAL, ctx.tracestate))

    def fanout(self, name: str, start: int, end: int, attributes: dict, parents: list[tuple]) -> None:
        self.fanouts.append(Fanout(name, start, end, attributes, parents))
        self.fanout_spans += len(parents)

    def settle(self, trace_id: int, reason: str | None) -> None:
        """The verdict on an undecided trace, once its root span is recorded: kept for `reason`
        ("error", "slow"), or discarded (None), with every process's spans of it."""
        self.undecided.add(trace_id)
        self.verdicts.append((trace_id, reason))

    def maybe_flush(self) -> None:
        if len(self.spans) + self.fanout_spans >= FLUSH_AT_SPANS or (
            (self.spans or self.fanouts) and time.perf_counter_ns() - self.last_flush >= FLUSH_EVERY_NS
        ):
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.perf_counter_ns()
        if not (self.spans or self.fanouts or self.dropped):
            return
        batch = ipc.SpanBatch(self.offset_ns, self.spans, self.fanouts, self.dropped, self.undecided, self.verdicts)
        try:
            self.sock.send(ipc.encode(batch), zmq.NOBLOCK)
            self.dropped = 0
            if self.undecided:
                self.undecided, self.verdicts = set(), []
        except zmq.Again:  # the exporter is behind: drop, count, carry on serving
            self.dropped += len(self.spans) + self.fanout_spans  # (verdicts go with the next batch)
        self.spans, self.fanouts, self.fanout_spans = [], [], 0
