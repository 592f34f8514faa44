"""The per-process span recorder: cheap tuples on the serving path, shipped in batches.

Serving processes never build OpenTelemetry objects. A finished span is one tuple appended
to a list; `flush()` pickles the list to the exporter process over ZMQ without blocking.
If the exporter cannot keep up, the batch is dropped and counted, never waited for.
Times are `perf_counter_ns()`; the batch carries this process's offset to epoch time.
"""

from __future__ import annotations

import os
import time
import uuid

import zmq

from loupe import ipc

SERVER, INTERNAL = 2, 1  # OpenTelemetry SpanKind values
# Few, larger messages: each one wakes threads in the sender and in the exporter, and on
# a busy machine every wake-up is taken from the model's threads.
FLUSH_EVERY_NS = 250_000_000
FLUSH_AT_SPANS = 512  # a fan-out counts one per request
SEND_HIGH_WATER_MARK = 256  # batches queued towards the exporter before new ones are dropped


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


def thread_span_name(label: str, ranks: dict[str, int] | None = None) -> str:
    rank_text = "".join(f" [{k} {v}]" for k, v in (ranks or {}).items())
    return f"{label}{rank_text} (host:{host_id()} | pid:{os.getpid()})"


class Recorder:
    def __init__(self, address: str, label: str, ranks: dict[str, int] | None = None,
                 rank_attributes: dict[str, int] | None = None):
        """`ranks` name the thread span (`{"TP": 0}` -> "[TP 0]"); `rank_attributes` default to
        them (`tp_rank`), and may list more (a scheduler has all three, named or not)."""
        self.label = label
        self.ranks = dict(ranks or {})
        self.thread_name = thread_span_name(label, ranks)
        if rank_attributes is None:
            rank_attributes = {f"{k.lower()}_rank": v for k, v in self.ranks.items()}
        self.thread_attributes = {"thread_label": label, "host_id": host_id(), "pid": os.getpid(), **rank_attributes}
        self.offset_ns = time.time_ns() - time.perf_counter_ns()
        self.spans: list[tuple] = []
        self.fanouts: list[tuple] = []
        self.fanout_spans = 0
        self.dropped = 0
        self.last_flush = time.perf_counter_ns()
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
        self.sock.setsockopt(zmq.LINGER, 2000)  # at exit, give queued batches 2 s to leave
        self.sock.connect(address)

    def span(self, trace_id: int, span_id: int, parent_id: int | None, name: str, start: int, end: int,
             attributes: dict | None = None, events: list | None = None, error: str | None = None,
             kind: int = INTERNAL, tracestate: str | None = None, remote_parent: bool = False) -> None:
        """One finished span. `events` are (name, perf_ns, attributes) tuples."""
        self.spans.append((trace_id, span_id, parent_id, name, start, end, attributes, events, error, kind,
                           tracestate, remote_parent))

    def fanout(self, name: str, start: int, end: int, attributes: dict, parents: list[tuple[int, int]]) -> None:
        """The same slice (say, one decode step) under each (trace_id, parent span id) of a
        batch: recorded once here, turned into one span per request by the exporter."""
        self.fanouts.append((name, start, end, attributes, parents))
        self.fanout_spans += len(parents)

    def maybe_flush(self) -> None:
        if len(self.spans) + self.fanout_spans >= FLUSH_AT_SPANS or (
            (self.spans or self.fanouts) and time.perf_counter_ns() - self.last_flush >= FLUSH_EVERY_NS
        ):
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.perf_counter_ns()
        if not (self.spans or self.fanouts or self.dropped):
            return
        batch = ipc.SpanBatch(self.offset_ns, self.spans, self.fanouts, self.dropped)
        try:
            self.sock.send(ipc.encode(batch), zmq.NOBLOCK)
            self.dropped = 0
        except zmq.Again:  # the exporter is behind: drop, count, carry on serving
            self.dropped += len(self.spans) + self.fanout_spans
        self.spans, self.fanouts, self.fanout_spans = [], [], 0
