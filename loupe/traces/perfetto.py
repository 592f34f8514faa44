"""`loupe traces export --format perfetto`: Chrome trace-event JSON, as Perfetto
(ui.perfetto.dev) and chrome://tracing open it.

A process per loupe process (host and pid), a track (thread) per thread span: a request's
stages nest on it, decode steps under `decode`. A request's root goes on a track of its own
in the HTTP process. Flow arrows lead from a root to each process's span of the request,
and from a prefill server's `kv_transfer` to the decode server's `kv_receive`. Span events
are instant marks on their span's track. Times are µs from the first span.
"""

from __future__ import annotations

from itertools import count

from loupe.traces.reader import Span

FLOW_CATEGORY = "request"


STARTUP_ROOT = "loupe start"  # the root of a server's start-up trace


def is_thread_span(span: Span) -> bool:
    return "thread_label" in span.attributes


class Tracks:
    """Synthetic pids and tids (real pids of several hosts may collide), and their names."""

    def __init__(self) -> None:
        self.pids: dict[tuple, int] = {}
        self.tids: dict[str, tuple[int, int]] = {}  # owner span id -> (pid, tid)
        self.next_tid = count(1)
        self.metadata: list[dict] = []

    def process(self, key: tuple, name: str) -> int:
        if key not in self.pids:
            pid = self.pids[key] = len(self.pids) + 1
            self.metadata += [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}},
                              {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                               "args": {"sort_index": pid}}]
        return self.pids[key]

    def track(self, owner: Span, pid: int, name: str) -> tuple[int, int]:
        if owner.span_id not in self.tids:
            tid = next(self.next_tid)
            self.tids[owner.span_id] = (pid, tid)
            self.metadata.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        return self.tids[owner.span_id]


def process_of(thread: Span, tracks: Tracks) -> int:
    """The process that recorded a thread span, named as loupe names it: `Scheduler [TP 0] (host:… | pid:…)`."""
    return tracks.process((thread.attributes.get("host_id"), thread.attributes.get("pid")), thread.name)


def place_trace(spans: list[Span], tracks: Tracks) -> dict[str, tuple[int, int]]:
    """Each span's (pid, tid)."""
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.is_request or s.parent_id not in by_id]
    threads = [s for s in spans if is_thread_span(s)]
    placed: dict[str, tuple[int, int]] = {}
    for root in roots:
        rid = root.attributes.get("rid", root.name)
        http = next((t for t in threads if t.parent_id == root.span_id and t.attributes["thread_label"] == "Tokenizer"),
                    None)
        if http is not None:
            pid = process_of(http, tracks)
        elif root.name == STARTUP_ROOT:  # a server's start: its child processes' tracks under it
            pid = tracks.process(("start", root.service), f"{root.service or 'loupe'} start")
        else:  # another service's request (a router's), or a request without its tokenizer's spans
            pid = tracks.process(("service", root.service), f"{root.service or 'loupe'} requests")
        placed[root.span_id] = tracks.track(root, pid, str(rid))
    for thread in threads:
        pid = process_of(thread, tracks)
        root = by_id.get(thread.parent_id)
        rid = root.attributes.get("rid", "") if root is not None else ""
        placed[thread.span_id] = tracks.track(thread, pid, f"{rid} {thread.name.split(' (host:')[0]}".strip())
    for span in spans:  # the rest sit on their nearest placed ancestor's track
        chain, s = [], span
        while s.span_id not in placed and s.parent_id in by_id:
            chain.append(s)
            s = by_id[s.parent_id]
        where = placed.get(s.span_id)
        if where is not None:
            for c in chain:
                placed[c.span_id] = where
    return placed


def flow(ids: count, source: tuple[int, int], target: tuple[int, int], ts: float, target_ts: float) -> list[dict]:
    flow_id = next(ids)
    return [{"ph": "s", "id": flow_id, "cat": FLOW_CATEGORY, "name": "request", "pid": source[0], "tid": source[1],
             "ts": ts},
            {"ph": "f", "bp": "e", "id": flow_id, "cat": FLOW_CATEGORY, "name": "request", "pid": target[0],
             "tid": target[1], "ts": target_ts}]


def trace_events(traces: dict[str, list[Span]]) -> dict:
    """The Chrome trace-event JSON document of these traces."""
    everything = [s for spans in traces.values() for s in spans]
    origin = min((s.start for s in everything), default=0)

    def us(ns: int) -> float:
        return (ns - origin) / 1000

    tracks, events, flow_ids = Tracks(), [], count(1)
    for spans in traces.values():
        placed = place_trace(spans, tracks)
        by_id = {s.span_id: s for s in spans}
        for span in sorted(spans, key=lambda s: (s.start, -s.end)):
            if span.span_id not in placed:
                continue
            pid, tid = placed[span.span_id]
            events.append({"ph": "X", "name": span.name.split(" (host:")[0], "cat": "span", "pid": pid, "tid": tid,
                           "ts": us(span.start), "dur": (span.end - span.start) / 1000,
                           "args": {"trace_id": span.trace_id, "span_id": span.span_id, **span.attributes}})
            events += [{"ph": "i", "s": "t", "name": e.name, "pid": pid, "tid": tid, "ts": us(e.time),
                        "args": e.attributes} for e in span.events]
            parent = by_id.get(span.parent_id)
            if is_thread_span(span) and parent is not None and placed.get(parent.span_id, (pid, tid)) != (pid, tid):
                events += flow(flow_ids, placed[parent.span_id], (pid, tid), us(span.start), us(span.start))
        sent = {s.attributes.get("bootstrap_room"): s for s in spans if s.name == "kv_transfer"}
        for received in (s for s in spans if s.name == "kv_receive"):
            source = sent.get(received.attributes.get("bootstrap_room"))
            if source is not None and source.span_id in placed and received.span_id in placed:
                events += flow(flow_ids, placed[source.span_id], placed[received.span_id], us(source.start),
                               us(received.start))
    return {"traceEvents": tracks.metadata + events, "displayTimeUnit": "ms",
            "otherData": {"origin_unix_ns": origin, "source": "loupe traces export"}}
