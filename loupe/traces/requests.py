"""Where one request's time went: its stages, from its root span and the spans beneath it.

TTFT, end to end, queue, prefill and decode are the root's `gen_ai.latency.*` attributes
(present at every trace level; the numbers /metrics observes), else the spans' own times.
Tokenize is the `tokenize` span, detokenize the `detokenize` span's busy time (level 2 and
up). "other" is what the sequential stages leave of end to end: HTTP handling, dispatch,
the hops between processes. Detokenizing overlaps decoding, so it is not subtracted.
"""

from __future__ import annotations

from dataclasses import dataclass

from loupe.traces.reader import STATUS_ERROR, Span

STAGES = ("tokenize", "queue", "prefill", "decode", "detokenize", "other")
SEQUENTIAL = ("tokenize", "queue", "prefill", "decode")  # one after the other within end to end
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


def route_of(root: Span) -> str:
    a = root.attributes
    route = a.get("http.route") or ROUTES.get(a.get("gen_ai.operation.name"), "?")
    role = a.get("disaggregation.role")
    return f"{route} ({role})" if role else route


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


def driver_stages(below: list[Span], children: dict[str | None, list[Span]]) -> dict[str, float]:
    """Queue, prefill and decode seconds from the driver scheduler rank's stage spans."""
    schedulers = [s for s in below if s.attributes.get("thread_label") == "Scheduler"]
    if not schedulers:
        return {}
    driver = min(schedulers, key=lambda s: (s.attributes.get("pp_rank", 0), s.attributes.get("tp_rank", 0)))
    seconds: dict[str, float] = {}
    for stage in children.get(driver.span_id, ()):
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
    from_spans = driver_stages(below, children)
    stages: dict[str, float | None] = {stage: first_known(a.get(name), from_spans.get(stage))
                                       for stage, name in LATENCY_ATTRIBUTES.items()}
    tokenize = [s.seconds for s in below if s.name == "tokenize"]
    stages["tokenize"] = sum(tokenize) if tokenize else None
    busy = [s.attributes.get("busy_seconds", s.seconds) for s in below if s.name == "detokenize"]
    stages["detokenize"] = sum(busy) if busy else None
    stages["other"] = max(0.0, e2e - sum(stages[s] or 0.0 for s in SEQUENTIAL))
    return RequestTimes(root.trace_id, str(a.get("rid", root.name[4:])), route_of(root), root.start,
                        root.status == STATUS_ERROR, e2e, ttft, {s: stages[s] for s in STAGES})


def all_requests(traces: dict[str, list[Span]]) -> list[RequestTimes]:
    """Every request (a `Req` root; a prefill/decode pair's trace has two), by arrival."""
    out = []
    for spans in traces.values():
        children = children_by_parent(spans)
        out.extend(request_times(s, children) for s in spans if s.is_request)
    return sorted(out, key=lambda r: r.start)
