"""Where one request's time went: its stages, from its root span and the spans beneath it.

TTFT, end to end, queue, prefill and decode are the root's `gen_ai.latency.*` attributes
(present at every trace level; the numbers /metrics observes), else the spans' own times.
Tokenize is the `tokenize` span, detokenize the `detokenize` span's busy time (level 2 and
up). "other" is what the sequential stages leave of end to end: HTTP handling, dispatch,
the hops between processes. Detokenizing overlaps decoding, so it is not subtracted.

A prefill/decode pair's two roots (one trace, one `bootstrap_room`) are one request: from
the first of its spans (the router's, when it traced) to the decode server's end, its TTFT
the decode server's first token; its prefill server's stages, then the bootstrap (the
prefill server holding the first token until the decode server claimed it) and the KV
transfer (from the KV leaving to the decode server having it), then the decode server's.
"""

from __future__ import annotations

from dataclasses import dataclass

from loupe.traces.reader import STATUS_ERROR, Span

STAGES = ("tokenize", "queue", "prefill", "bootstrap", "kv transfer", "decode", "detokenize", "other")
SEQUENTIAL = ("tokenize", "queue", "prefill", "bootstrap", "kv transfer", "decode")  # one after the other
ROUTES = {"chat": "/v1/chat/completions", "text_completion": "/v1/completions", "generate": "/generate"}
LATENCY_ATTRIBUTES = {"queue": "gen_ai.latency.time_in_queue", "prefill": "gen_ai.latency.time_in_model_prefill",
                      "decode": "gen_ai.latency.time_in_model_decode"}


@dataclass
class RequestTimes:
    trace_id: str
    rid: str
    route: str
    start: int  # epoch ns of the root span
    error: bool
    e2e: float
    ttft: float | None
    stages: dict[str, float | None]

    @property
    def dominant(self) -> tuple[str, float]:
        """The stage that took longest, and its seconds."""
        known = [(seconds, stage) for stage, seconds in self.stages.items() if seconds is not None]
        seconds, stage = max(known, default=(0.0, "other"))
        return stage, seconds


def route_of(root: Span, with_role: bool = True) -> str:
    a = root.attributes
    route = a.get("http.route") or ROUTES.get(a.get("gen_ai.operation.name"), "?")
    role = a.get("disaggregation.role")
    return f"{route} ({role})" if role and with_role else route


@dataclass
class Pair:
    """A prefill/decode pair's roots of one request, and when its first token passed between them."""

    prefill: Span
    decode: Span
    router: Span | None  # the router's span both roots hang under, when it is in the files
    prefill_queue: Span | None  # the prefill server's queue stage
    prefill_stage: Span  # and its prefill stage, which holds:
    handed_off: int  # the first token made; from here it waits for the decode server's claim
    transfer: Span  # the KV leaving (kv_transfer: bytes, backend)
    decode_queue: Span | None  # the decode server's queue stage
    kv_arrived: int  # the decode server had the KV: its decode stage began

    @property
    def start(self) -> int:
        return min(self.prefill.start, self.decode.start, *([self.router.start] if self.router else []))

    @property
    def end(self) -> int:
        """The decode server's answer done (the router's span can end seconds later: SGLang's
        router 0.3.2 ends it late when the client closes its connection)."""
        return self.decode.end

    @property
    def first_token(self) -> int | None:
        return next((e.time for e in self.decode.events if e.name == "first_token"), None)

    @property
    def moved(self) -> float:
        """Seconds from the KV leaving the prefill server to the decode server having it."""
        return seconds_between(self.transfer.start, self.kv_arrived)

    def transfer_text(self) -> str:
        gigabytes = self.transfer.attributes.get("bytes", 0) / 1e9
        rate = f", {gigabytes / self.moved:.3g} GB/s" if self.moved else ""
        return f"{gigabytes * 1000:.1f} MB{rate}, {self.transfer.attributes.get('backend', '?')}"

    def hops(self) -> list[tuple[str, float, str]]:
        """The request's way to its first token: each hop, its seconds and a note."""
        waited = self.decode_queue is not None and self.decode_queue.end <= self.handed_off
        return [("router", seconds_between(self.start, self.prefill.start), "to the prefill server"),
                ("prefill queue", self.prefill_queue.seconds if self.prefill_queue else 0.0, ""),
                ("prefill", seconds_between(self.prefill_stage.start, self.handed_off), ""),
                ("bootstrap", seconds_between(self.handed_off, self.transfer.start), "the decode server's claim"),
                ("KV transfer", self.moved, self.transfer_text()),
                ("decode queue", self.decode_queue.seconds if self.decode_queue else 0.0,
                 "while the prefill ran" if waited else ""),
                ("first token", seconds_between(self.kv_arrived, self.first_token or self.kv_arrived), "")]


def seconds_between(start: int, end: int) -> float:
    """From `start` to `end` (epoch ns), never negative (two hosts' clocks may disagree)."""
    return max(end - start, 0) / 1e9


def hops_text(hops: list[tuple[str, float, str]]) -> str:
    return "to the first token: " + " → ".join(f"{hop} {seconds * 1000:.1f} ms" + (f" ({note})" if note else "")
                                               for hop, seconds, note in hops)


def pairs(spans: list[Span], children: dict[str | None, list[Span]]) -> list[Pair]:
    """The prefill/decode pairs among a trace's roots: those whose hand-off is all in the spans
    (at level 2 and up, and not failed on the way); other roots stand alone."""
    by_room: dict[object, dict[str, Span]] = {}
    for root in spans:
        role = root.attributes.get("disaggregation.role")
        if root.is_request and role in ("prefill", "decode"):
            by_room.setdefault(root.attributes.get("bootstrap_room"), {})[role] = root
    by_id = {s.span_id: s for s in spans}
    out = []
    for roots in by_room.values():
        if len(roots) < 2:
            continue
        p_stages, d_stages = (driver_stage_spans(roots[role], children) for role in ("prefill", "decode"))
        prefill = next((s for s in p_stages if s.name == "prefill"), None)
        handoff = {s.name: s for s in children.get(prefill.span_id, ())} if prefill else {}
        decode = next((s for s in d_stages if s.name == "decode"), None)
        if "kv_transfer" not in handoff or decode is None:
            continue
        handed_off = handoff["bootstrap"].start if "bootstrap" in handoff else handoff["kv_transfer"].start
        same_parent = roots["prefill"].parent_id == roots["decode"].parent_id
        out.append(Pair(roots["prefill"], roots["decode"], by_id.get(roots["prefill"].parent_id) if same_parent else None,
                        next((s for s in p_stages if s.name == "queue"), None), prefill, handed_off,
                        handoff["kv_transfer"], next((s for s in d_stages if s.name == "queue"), None), decode.start))
    return out


def schedulers(root: Span, children: dict[str | None, list[Span]]) -> list[Span]:
    """The request's scheduler thread spans, the driver rank (TP 0, PP 0) first."""
    threads = [s for s in children.get(root.span_id, ()) if s.attributes.get("thread_label") == "Scheduler"]
    return sorted(threads, key=lambda s: (s.attributes.get("pp_rank", 0), s.attributes.get("tp_rank", 0)))


def driver_stage_spans(root: Span, children: dict[str | None, list[Span]]) -> list[Span]:
    """The stage spans of the request's driver scheduler rank, by start."""
    threads = schedulers(root, children)
    return sorted(children.get(threads[0].span_id, ()), key=lambda s: s.start) if threads else []


def children_by_parent(spans: list[Span]) -> dict[str | None, list[Span]]:
    children: dict[str | None, list[Span]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)
    return children


def descendants(span: Span, children: dict[str | None, list[Span]]) -> list[Span]:
    out, todo = [], list(children.get(span.span_id, ()))
    while todo:
        s = todo.pop()
        out.append(s)
        todo.extend(children.get(s.span_id, ()))
    return out


def driver_stages(root: Span, children: dict[str | None, list[Span]]) -> dict[str, float]:
    """Queue, prefill and decode seconds from the driver scheduler rank's stage spans."""
    seconds: dict[str, float] = {}
    for stage in driver_stage_spans(root, children):
        seconds[stage.name] = seconds.get(stage.name, 0.0) + stage.seconds
    return seconds


def first_known(*values):
    return next((v for v in values if v is not None), None)


def request_times(root: Span, children: dict[str | None, list[Span]]) -> RequestTimes:
    a = root.attributes
    below = descendants(root, children)
    e2e = first_known(a.get("gen_ai.latency.e2e"), root.seconds)
    ttft = a.get("gen_ai.latency.time_to_first_token")
    if ttft is None:
        first = next((e for e in root.events if e.name == "first_token"), None)
        ttft = (first.time - root.start) / 1e9 if first else None
    from_spans = driver_stages(root, children)
    stages: dict[str, float | None] = {stage: first_known(a.get(name), from_spans.get(stage))
                                       for stage, name in LATENCY_ATTRIBUTES.items()}
    tokenize = [s.seconds for s in below if s.name == "tokenize"]
    stages["tokenize"] = sum(tokenize) if tokenize else None
    busy = [s.attributes.get("busy_seconds", s.seconds) for s in below if s.name == "detokenize"]
    stages["detokenize"] = sum(busy) if busy else None
    return RequestTimes(root.trace_id, str(a.get("rid", root.name[4:])), route_of(root), root.start,
                        root.status == STATUS_ERROR, e2e, ttft, with_other(stages, e2e))


def with_other(stages: dict[str, float | None], e2e: float) -> dict[str, float | None]:
    stages["other"] = max(0.0, e2e - sum(stages.get(s) or 0.0 for s in SEQUENTIAL))
    return {s: stages.get(s) for s in STAGES}


def pair_times(pair: Pair, children: dict[str | None, list[Span]]) -> RequestTimes:
    """A pair as one request: the prefill server's stages, the hand-off's two, the decode server's."""
    p, d = request_times(pair.prefill, children), request_times(pair.decode, children)
    e2e, first = (pair.end - pair.start) / 1e9, pair.first_token
    hops = {name: seconds for name, seconds, _ in pair.hops()}
    stages = {"tokenize": p.stages["tokenize"], "queue": p.stages["queue"], "prefill": p.stages["prefill"],
              "bootstrap": hops["bootstrap"], "kv transfer": hops["KV transfer"], "decode": d.stages["decode"],
              "detokenize": d.stages["detokenize"]}
    return RequestTimes(pair.decode.trace_id, d.rid, route_of(pair.decode, with_role=False), pair.start,
                        p.error or d.error, e2e, (first - pair.start) / 1e9 if first else None, with_other(stages, e2e))


def all_requests(traces: dict[str, list[Span]], join_pairs: bool = True) -> list[RequestTimes]:
    """Every request, by arrival: a `Req` root, or a prefill/decode pair's two as one (unless
    not `join_pairs`: each server's root on its own)."""
    out = []
    for spans in traces.values():
        children = children_by_parent(spans)
        joined = pairs(spans, children) if join_pairs else []
        out.extend(pair_times(pair, children) for pair in joined)
        paired = {id(root) for pair in joined for root in (pair.prefill, pair.decode)}
        out.extend(request_times(s, children) for s in spans if s.is_request and id(s) not in paired)
    return sorted(out, key=lambda r: r.start)
