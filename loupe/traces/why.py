"""`loupe traces why`: why one request took the time it did.

A request's time, from its root span's start to its end, is cut into intervals, each given
to one cause; what no span covers is "unexplained", so the causes always add up to the
whole. The same intervals cut at the first token give the causes of its TTFT.

- HTTP and tokenization: the root's start to the end of `dispatch` (tokenize, send).
- queued: from then until its prefill starts: the forward pass in flight when it arrived
  (the scheduler reads new requests between passes), then its `queue` stage.
- own prefill: its `prefill_chunk` spans (level 3; else its `prefill` stage), with the
  prompt tokens computed and those reused from the prefix cache; after a retraction, the
  prefill again is "re-prefill after a retraction".
- interference: the part of each of its decode steps beyond the scheduler's median
  decode-only step of as many decoding requests (in the same files), when other requests'
  prefill chunks ran in that step; the requests whose chunks those were are named.
- long contexts: the part beyond that usual step of a decode-only step that attended at
  least twice the usual KV tokens (decode_step's `kv_tokens`: its own and its batch-mates').
- decode: the rest of its decode steps.
- between steps: what its stages leave between their steps (scheduling, sampling output,
  handing tokens on).
- detokenize and stream: the scheduler's last output to the root's end.

Level 3 explains all of these. Level 2 has no step spans: a decode stage's counts (its
passes, those shared with prefill chunks, their seconds and the chunks' tokens) give
interference against the request's own usual decode-only pass, without naming the requests,
and long contexts stay in decode. Level 1 has only the root's latency attributes.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from rich.table import Table

from loupe.traces.reader import STATUS_ERROR, Span
from loupe.traces.requests import Pair, children_by_parent, hops_text, pairs, route_of, schedulers

CAUSES = ("router", "HTTP and tokenization", "queued", "own prefill", "re-prefill after a retraction", "bootstrap wait",
          "KV transfer", "decode queue", "interference", "long contexts", "decode", "between steps",
          "detokenize and stream", "unexplained")
HANDOFF_SPANS = ("bootstrap", "kv_transfer", "kv_receive")
LONG_CONTEXT = 2  # a decode step attending this many times the usual KV tokens is slowed by long contexts
STEP_SPANS = ("prefill_chunk", "decode_step")
EVIDENCE_FROM_NS = 1_000_000  # a pair shows a server's evidence for a cause that took this long on its path


@dataclass
class Batch:
    """One forward pass of one scheduler, as its requests' step spans and `schedule` events saw it."""

    start: int
    end: int
    mode: str = "?"
    size: int = 0
    kv_tokens: int = 0  # tokens its decodes attended (decode_step's kv_tokens)
    chunks: list[tuple[str, int]] = field(default_factory=list)  # (rid, prompt tokens) of its prefill chunks

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / 1e9


def quietly(items: Collection, what: str) -> Iterable:
    """`items` as they are. Passes and explain_all walk traces and requests through
    `each(items, what)`, which `loupe traces` makes a progress bar on a terminal."""
    return items


class Passes:
    """Every forward pass in the files, by (scheduler, batch id), and each scheduler's
    decode-only passes by batch size (the baseline a step is measured against)."""

    def __init__(self, traces: dict[str, list[Span]], each: Callable[[Collection, str], Iterable] = quietly):
        self.batches: dict[tuple[str, int], Batch] = {}
        self.prompt_tokens: dict[str, int] = {}  # rid: its prompt's length
        self.children: dict[str, dict[str | None, list[Span]]] = {}  # trace id: its spans by parent (explain's too)
        for trace_id, spans in each(traces.items(), "indexing forward passes"):
            children = self.children[trace_id] = children_by_parent(spans)
            for root in (s for s in spans if s.is_request):
                rid = rid_of(root)
                self.prompt_tokens[rid] = int(root.attributes.get("gen_ai.usage.prompt_tokens", 0) or 0)
                for thread in schedulers(root, children):
                    self._add(rid, thread, children)
        by_size: dict[tuple[str, int], list[Batch]] = {}
        for (scheduler, _), batch in self.batches.items():
            if batch.mode == "decode":
                by_size.setdefault((scheduler, batch.size), []).append(batch)
        # (scheduler, batch size): the median decode-only pass's seconds and KV tokens
        self.decode_only = {key: (statistics.median(b.seconds for b in batches),
                                  statistics.median(b.kv_tokens for b in batches))
                            for key, batches in by_size.items()}
        self.nearest: dict[tuple[str, int], tuple[float, float] | None] = {}  # baseline's answers
        self.sizes: dict[str, list[int]] = {}  # scheduler: the batch sizes it ran decode-only
        for scheduler, size in self.decode_only:
            self.sizes.setdefault(scheduler, []).append(size)
        self.timeline: dict[str, list[tuple[int, int, object]]] = {}  # scheduler: (start, end, id) of its passes
        for (scheduler, batch_id), batch in self.batches.items():
            self.timeline.setdefault(scheduler, []).append((batch.start, batch.end, batch_id))
        for passes in self.timeline.values():
            passes.sort(key=lambda p: p[0])

    def _add(self, rid: str, thread: Span, children: dict) -> None:
        for event in thread.events:
            if event.name == "schedule":
                batch = self.batch(thread.name, event.attributes.get("batch_id"), event.time, event.time)
                batch.mode, batch.size = event.attributes.get("mode", "?"), event.attributes.get("batch_size", 0)
        for stage in children.get(thread.span_id, ()):
            for step in children.get(stage.span_id, ()):
                if step.name in STEP_SPANS:
                    batch = self.batch(thread.name, step.attributes.get("batch_id"), step.start, step.end)
                    batch.start, batch.end = step.start, step.end
                    batch.size = batch.size or step.attributes.get("batch_size", 0)
                    batch.kv_tokens = step.attributes.get("kv_tokens", batch.kv_tokens)
                    if step.name == "prefill_chunk":
                        batch.chunks.append((rid, int(step.attributes.get("num_tokens", 0))))

    def batch(self, scheduler: str, batch_id, start: int, end: int) -> Batch:
        return self.batches.setdefault((scheduler, batch_id), Batch(start, end))

    def children_of(self, trace_id: str, spans: list[Span]) -> dict[str | None, list[Span]]:
        """A trace's spans by parent: the index built with the passes, or (a trace they were not
        built from) made now."""
        return self.children.get(trace_id) or children_by_parent(spans)

    def baseline(self, scheduler: str, size: int) -> tuple[float, float] | None:
        """The median decode-only pass of this scheduler with the nearest batch size: its
        seconds and KV tokens (looked up once per size: it is asked for every step)."""
        key = (scheduler, size)
        if key not in self.nearest:
            sizes = self.sizes.get(scheduler)
            nearest = min(sizes, key=lambda s: (abs(s - size), s)) if sizes else None
            self.nearest[key] = self.decode_only[(scheduler, nearest)] if sizes else None
        return self.nearest[key]

    def in_flight(self, scheduler: str, at: int) -> tuple[int, Batch] | None:
        """The pass this scheduler was running at `at` (epoch ns), with its id."""
        passes = self.timeline.get(scheduler, [])
        i = bisect.bisect_right(passes, at, key=lambda p: p[0]) - 1  # the last pass that began by then
        if i >= 0 and at < passes[i][1]:
            return passes[i][2], self.batches[(scheduler, passes[i][2])]
        return None


def rid_of(root: Span) -> str:
    return str(root.attributes.get("rid", root.name[4:]))


@dataclass
class Cause:
    name: str
    e2e: float = 0.0  # seconds of end to end
    ttft: float = 0.0  # seconds before the first token
    evidence: list[str] = field(default_factory=list)


@dataclass
class Explanation:
    trace_id: str
    rid: str
    route: str
    level: int
    e2e: float
    ttft: float | None
    causes: list[Cause]
    notes: list[str]
    token_gaps: list[float] = field(default_factory=list)  # seconds between its tokens (level 3)
    stall: tuple[float, str] | None = None  # the longest of those gaps, and what made it
    intervals: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end epoch ns, cause)
    error: bool = False
    hops: list[tuple[str, float, str]] = field(default_factory=list)  # a pair's way to its first token
    servers: list[Explanation] = field(default_factory=list)  # a pair's: each server's root on its own

    def cause(self, name: str) -> Cause | None:
        return next((c for c in self.causes if c.name == name), None)

    def as_dict(self) -> dict:
        out = {"trace_id": self.trace_id, "rid": self.rid, "route": self.route, "level": self.level,
               "e2e": self.e2e, "ttft": self.ttft, "error": self.error, "notes": self.notes, "stall": self.stall,
               "causes": [{"cause": c.name, "e2e": c.e2e, "ttft": c.ttft, "evidence": c.evidence}
                          for c in self.causes]}
        if self.servers:
            out["hops"] = [{"hop": name, "seconds": seconds, "note": note} for name, seconds, note in self.hops]
            out["servers"] = [e.as_dict() for e in self.servers]
        return out


class Timeline:
    """Intervals of a request's time, each given to a cause; summed over the whole and up to
    the first token."""

    def __init__(self, start: int, end: int, first_token: int | None):
        self.start, self.end, self.first_token = start, end, first_token
        self.causes = {name: Cause(name) for name in CAUSES}
        self.token_gaps: list[float] = []
        self.stall: tuple[float, str] | None = None
        self.intervals: list[tuple[int, int, str]] = []

    def add(self, cause: str, start: int, end: int, evidence: str | None = None) -> None:
        start, end = max(start, self.start), min(end, self.end)
        if end > start:
            self.intervals.append((start, end, cause))
            c = self.causes[cause]
            c.e2e += (end - start) / 1e9
            if self.first_token is not None:
                c.ttft += max(0, min(end, self.first_token) - start) / 1e9
        if evidence:
            self.causes[cause].evidence.append(evidence)

    def take(self, side: Explanation, role: str, start: int, end: int, rename: dict[str, str] | None = None,
             fill: str | None = None) -> None:
        """`side`'s intervals within [start, end) (their causes renamed), with their evidence
        (said to be the `role` server's) where one gave its cause a millisecond or more; what
        they leave of it goes to `fill`."""
        rename = rename or {}
        at = start
        for a, b, cause in sorted(side.intervals):
            a, b = max(a, start), min(b, end)
            if b <= a:
                continue
            if fill and a > at:
                self.add(fill, at, a)
            name = rename.get(cause, cause)
            self.add(name, a, b)
            at = max(at, b)
            if b - a >= EVIDENCE_FROM_NS:
                evidence = self.causes[name].evidence
                evidence.extend(f"{role}: {e}" for e in side.cause(cause).evidence if f"{role}: {e}" not in evidence)
        if fill and end > at:
            self.add(fill, at, end)

    def explanation(self, root: Span, route: str, level: int, notes: list[str], **more) -> Explanation:
        """The causes, ranked, with what no interval covers as "unexplained" (always shown)."""
        e2e = (self.end - self.start) / 1e9
        ttft = (self.first_token - self.start) / 1e9 if self.first_token is not None else None
        unexplained = self.causes["unexplained"]
        unexplained.e2e = max(0.0, e2e - sum(c.e2e for c in self.causes.values()))
        unexplained.ttft = max(0.0, (ttft or 0.0) - sum(c.ttft for c in self.causes.values()))
        shown = [c for c in self.causes.values() if c.e2e > 0 or c.evidence or c is unexplained]
        causes = sorted(shown, key=lambda c: (c is unexplained, -c.e2e))
        return Explanation(root.trace_id, rid_of(root), route, level, e2e, ttft, causes, notes, self.token_gaps,
                           self.stall, self.intervals, **more)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def explain(root: Span, spans: list[Span], passes: Passes) -> Explanation:
    """Where `root`'s request spent its time, as causes (see the module's docstring)."""
    children = passes.children_of(root.trace_id, spans)
    first = next((e.time for e in root.events if e.name == "first_token"), None)
    line = Timeline(root.start, root.end, first)
    threads_below = {c.span_id for c in children.get(root.span_id, ())}
    below = [s for s in spans if s.parent_id in threads_below]  # tokenize, dispatch, the stages, detokenize
    threads = schedulers(root, children)
    notes: list[str] = []
    level = 1
    if not threads:
        notes.append("level 1: only the root's latency attributes; run at level 3 for causes")
        explain_from_attributes(root, line)
    else:
        level = 2
        thread = threads[0]
        # The last dispatch (by the DP controller too), unless the scheduler had the request first
        # (it may read it before the sender's call returns).
        dispatched = min(max((s.end for s in below if s.name == "dispatch"), default=thread.start), thread.start)
        tokenize = next((s for s in below if s.name == "tokenize"), None)
        line.add("HTTP and tokenization", root.start, dispatched,
                 f"tokenize {ms(tokenize.seconds)} ({tokenize.attributes.get('num_tokens')} tokens)" if tokenize else None)
        if any(step.name in STEP_SPANS for stage in children.get(thread.span_id, ())
               for step in children.get(stage.span_id, ())):
            level = 3
        else:
            notes.append("level 2: interference from the decode stage's counts, against its own usual step, "
                         "without naming whose prefill; long contexts not told apart")
        in_flight = passes.in_flight(thread.name, dispatched)
        line.add("queued", dispatched, thread.start, None if in_flight is None or thread.start - dispatched < 1e6
                 else f"{ms((thread.start - dispatched) / 1e9)} for the forward pass in flight when it arrived "
                      f"(batch {in_flight[0]}: {in_flight[1].mode}, {count(in_flight[1].size, 'request')})")
        explain_stages(rid_of(root), thread, children, passes, line)
        line.add("detokenize and stream", thread.end, root.end)
    return line.explanation(root, route_of(root), level, notes, error=root.status == STATUS_ERROR)


def explain_pair(pair: Pair, spans: list[Span], passes: Passes) -> Explanation:
    """A prefill/decode pair as one request. Its way to the first token is cut into windows,
    each told by the server the request waited on then: the router until the prefill server had
    it; the prefill server until its first token; the decode server until the KV began to leave
    (its queue is "decode queue"; claimed, "bootstrap wait"); "KV transfer" until the decode
    server had it; the decode server to the end."""
    p, d = explain(pair.prefill, spans, passes), explain(pair.decode, spans, passes)
    edges = list(itertools.accumulate([pair.start, pair.prefill.start, pair.handed_off, pair.transfer.start,
                                       pair.kv_arrived, pair.end], max))  # clocks of two hosts may disagree
    line = Timeline(pair.start, pair.end, pair.first_token)
    line.add("router", edges[0], edges[1])
    line.take(p, "prefill", edges[1], edges[2])
    line.take(d, "decode", edges[2], edges[3], rename={"queued": "decode queue"}, fill="bootstrap wait")
    children = passes.children_of(pair.decode.trace_id, spans)
    busy = passes.in_flight(schedulers(pair.decode, children)[0].name, pair.transfer.start)
    line.add("KV transfer", edges[3], edges[4], f"{pair.transfer_text()}: from leaving the prefill server to the "
             "decode server having it" + ("" if busy is None else f", which was running a forward pass until "
                                          f"{ms((busy[1].end - pair.transfer.start) / 1e9)} later (batch {busy[0]})"))
    for role, side in (("prefill", p), ("decode", d)):
        if (moved := side.cause("KV transfer")) is not None:  # a decode server's kv_receive may not be recorded
            line.causes["KV transfer"].evidence += [f"{role}: {e}" for e in moved.evidence]
    line.take(d, "decode", edges[4], edges[5])
    line.token_gaps, line.stall = d.token_gaps, d.stall
    notes = [f"a prefill/decode pair: {p.rid} on the prefill server, {d.rid} on the decode server "
             f"(room {pair.decode.attributes.get('bootstrap_room')})", *dict.fromkeys(p.notes + d.notes)]
    return line.explanation(pair.decode, route_of(pair.decode, with_role=False), min(p.level, d.level), notes,
                            error=p.error or d.error, hops=pair.hops(), servers=[p, d])


def explain_stages(rid: str, thread: Span, children: dict, passes: Passes, line: Timeline) -> None:
    prefills = 0
    for stage in sorted(children.get(thread.span_id, ()), key=lambda s: s.start):
        steps = sorted((s for s in children.get(stage.span_id, ()) if s.name in STEP_SPANS), key=lambda s: s.start)
        if stage.name == "queue":
            ahead = stage.attributes
            note = ("after a retraction" if ahead.get("retracted") else
                    f"{ahead['running']} running and {ahead['waiting']} waiting ahead of it when it arrived"
                    if "running" in ahead else None)
            line.add("queued", stage.start, stage.end, f"queue {ms(stage.seconds)}" + (f", {note}" if note else ""))
        elif stage.name == "prefill":
            prefills += 1
            cause = "own prefill" if prefills == 1 else "re-prefill after a retraction"
            cached = int(stage.attributes.get("cached_tokens", 0) or 0)
            total = int(stage.attributes.get("num_tokens", 0) or 0)
            evidence = f"{total - cached} prompt tokens computed, {cached} reused from the prefix cache"
            if steps:
                evidence += f", {count(len(steps), 'chunk')}"
            line.add(cause, stage.start, stage.end if not steps else stage.start, evidence)
            for step in steps:
                line.add(cause, step.start, step.end)
            handoff = explain_handoff(stage, children, line)  # a prefill server's, after its chunks
            between(stage, sorted(steps + handoff, key=lambda s: s.start), line)
        elif stage.name == "decode":
            explain_decode(rid, thread, stage, steps, passes, line)
        elif stage.name == "bootstrap":  # a decode server's: claimed, waiting for the prefill server's KV
            received = explain_handoff(stage, children, line)  # taking the KV in is the transfer's end
            line.add("bootstrap wait", stage.start, received[0].start if received else stage.end,
                     f"{ms(stage.seconds)} from its claim on {stage.attributes.get('prefill_server', 'its prefill server')}"
                     " to having the KV")
            if received:
                line.add("bootstrap wait", received[-1].end, stage.end)
        else:
            line.add("unexplained", stage.start, stage.end, f"a stage loupe does not know: {stage.name}")


def explain_handoff(stage: Span, children: dict, line: Timeline) -> list[Span]:
    """A prefill/decode pair's hand-off spans under `stage`: waiting for the decode server's claim
    (`bootstrap`), and the KV leaving (`kv_transfer`) or taken in (`kv_receive`)."""
    spans = sorted((s for s in children.get(stage.span_id, ()) if s.name in HANDOFF_SPANS), key=lambda s: s.start)
    for span in spans:
        if span.name == "bootstrap":
            line.add("bootstrap wait", span.start, span.end, f"{ms(span.seconds)} waiting for the decode server's claim")
        else:
            a = span.attributes
            done = "sent, until its receipt came back," if span.name == "kv_transfer" else "placed in the KV cache"
            line.add("KV transfer", span.start, span.end, f"{a.get('bytes', 0) / 1e6:.1f} MB {done} in "
                     f"{ms(span.seconds)} ({a.get('backend', '?')}, {count(a.get('pages', 0), 'page')})")
    return spans


def explain_decode(rid: str, thread: Span, stage: Span, steps: list[Span], passes: Passes, line: Timeline) -> None:
    """Each step up to the scheduler's usual decode-only step of its batch size is decode; what
    is beyond goes to interference when other requests' prefill chunks ran in it, to long
    contexts when it attended at least LONG_CONTEXT times the usual KV tokens."""
    if not steps:
        explain_decode_counts(stage, line)
        return
    culprits: dict[str, list[float]] = {}  # rid: [extra seconds, steps shared]
    long_steps: list[tuple[float, int, float]] = []  # (extra seconds, KV tokens, usual KV tokens)
    made_by = []  # what made each step as long as it was
    for step in steps:
        batch = passes.batches.get((thread.name, step.attributes.get("batch_id")))
        usual = passes.baseline(thread.name, decoding(step, batch))
        others = [(r, n) for r, n in batch.chunks if r != rid] if batch else []
        long = batch is not None and usual is not None and batch.kv_tokens >= LONG_CONTEXT * max(usual[1], 1)
        if usual is None or step.seconds <= usual[0] or not (others or long):
            line.add("decode", step.start, step.end)
            made_by.append("decode")
            continue
        split = step.start + int(usual[0] * 1e9)
        line.add("decode", step.start, split)
        extra = (step.end - split) / 1e9
        if others:
            line.add("interference", split, step.end)
            tokens = sum(n for _, n in others) or 1
            made_by.append("interference: the prefill of " + max(others, key=lambda o: o[1])[0])
            for other, n in others:
                share = culprits.setdefault(other, [0.0, 0])
                share[0] += extra * n / tokens
                share[1] += 1
        else:
            line.add("long contexts", split, step.end)
            long_steps.append((extra, batch.kv_tokens, usual[1]))
            made_by.append(f"long contexts: {batch.kv_tokens:,} KV tokens")
    for other, (extra, shared) in sorted(culprits.items(), key=lambda kv: -kv[1][0]):
        line.add("interference", 0, 0, f"shared {count(shared, 'step')} with the "
                 f"{passes.prompt_tokens.get(other, 0):,}-token prefill of {other}: +{ms(extra)}")
    if long_steps:
        line.add("long contexts", 0, 0, f"{count(len(long_steps), 'step')} attended "
                 f"{statistics.mean(k for _, k, _ in long_steps):,.0f} KV tokens on average, against a usual "
                 f"{statistics.mean(u for _, _, u in long_steps):,.0f}: +{ms(sum(e for e, _, _ in long_steps))}")
    slowest = max(steps, key=lambda s: s.seconds)
    usual = passes.baseline(thread.name, decoding(slowest, passes.batches.get((thread.name,
                                                                               slowest.attributes.get("batch_id")))))
    line.add("decode", 0, 0, f"{len(steps)} steps, the slowest {ms(slowest.seconds)} (step "
             f"{slowest.attributes.get('step')}, batch {slowest.attributes.get('batch_id')})"
             + (f" against a usual {ms(usual[0])}" if usual is not None else ""))
    between(stage, steps, line)
    ends = [stage.start, *(s.end for s in steps)]  # the first token came as the decode stage began
    line.token_gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(ends)]
    worst = max(range(len(steps)), key=line.token_gaps.__getitem__)
    line.stall = (line.token_gaps[worst], f"step {steps[worst].attributes.get('step')}, {made_by[worst]}")


def decoding(step: Span, batch: Batch | None) -> int:
    """The requests decoding in a step's pass: its size less the prefill chunks in it (those of
    traced requests: an untraced one's chunk counts as decoding). A mixed pass is measured
    against the decode-only pass of that many."""
    return step.attributes.get("batch_size", 0) - (len(batch.chunks) if batch else 0)


def explain_decode_counts(stage: Span, line: Timeline) -> None:
    """Level 2: the decode stage's counts of its passes. Interference is what its passes shared
    with prefill chunks took beyond its own usual decode-only pass, laid after its decode (the
    counts do not say when, nor whose chunks); the stage's time outside its passes is between
    steps."""
    a = stage.attributes
    steps, step_seconds = a.get("steps", 0), a.get("step_seconds", 0.0)
    if not steps:
        line.add("decode", stage.start, stage.end, f"{a.get('completion_tokens', '?')} tokens")
        return
    mixed, mixed_seconds = a.get("mixed_steps", 0), a.get("mixed_seconds", 0.0)
    usual = (step_seconds - mixed_seconds) / (steps - mixed) if steps > mixed else None
    extra = max(0.0, mixed_seconds - mixed * usual) if usual is not None else 0.0
    at = stage.start + int((step_seconds - extra) * 1e9)
    line.add("decode", stage.start, at, f"{count(steps, 'step')} in {ms(step_seconds)}"
             + (f", its usual step {ms(usual)}" if usual is not None else ""))
    if mixed:
        line.add("interference", at, at + int(extra * 1e9),
                 f"{mixed} of its steps shared their pass with {a.get('mixed_prefill_tokens', 0):,} prompt tokens of "
                 f"other requests: +{ms(extra)}" + ("" if usual is not None else " (no step of its own to compare)"))
    line.add("between steps", at + int(extra * 1e9), stage.end)


def between(stage: Span, steps: list[Span], line: Timeline) -> None:
    """The time a stage leaves between its steps."""
    if not steps:
        return
    edges = [stage.start, *(t for s in steps for t in (s.start, s.end)), stage.end]
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        line.add("between steps", start, end)


def explain_from_attributes(root: Span, line: Timeline) -> None:
    """Level 1: the root's gen_ai.latency attributes, laid end to end after tokenization."""
    a = root.attributes
    at = root.start
    for cause, name in (("queued", "gen_ai.latency.time_in_queue"), ("own prefill", "gen_ai.latency.time_in_model_prefill"),
                        ("decode", "gen_ai.latency.time_in_model_decode")):
        seconds = a.get(name)
        if seconds:
            line.add(cause, at, at + int(seconds * 1e9))
            at += int(seconds * 1e9)


def explain_all(traces: dict[str, list[Span]], roots: list[Span],
                each: Callable[[Collection, str], Iterable] = quietly) -> list[Explanation]:
    """Each root's request explained; a prefill/decode pair's two roots as one request, once."""
    passes = Passes(traces, each)
    pair_of: dict[tuple[str, str], Pair] = {}  # (trace id, root span id): its pair
    for trace_id in dict.fromkeys(root.trace_id for root in roots):
        spans = traces[trace_id]
        for pair in pairs(spans, passes.children_of(trace_id, spans)):
            pair_of[(trace_id, pair.prefill.span_id)] = pair_of[(trace_id, pair.decode.span_id)] = pair
    out, done = [], set()
    for root in each(roots, "explaining requests"):
        pair = pair_of.get((root.trace_id, root.span_id))
        if pair is None:
            out.append(explain(root, traces[root.trace_id], passes))
        elif id(pair) not in done:
            done.add(id(pair))
            out.append(explain_pair(pair, traces[root.trace_id], passes))
    return out


def explain_succeeded(traces: dict[str, list[Span]],
                      each: Callable[[Collection, str], Iterable] = quietly) -> list[Explanation]:
    """Every request that succeeded (a run's view leaves failed ones out, as the summary's latencies do)."""
    explained = explain_all(traces, [s for spans in traces.values() for s in spans if s.is_request], each)
    return [e for e in explained if not e.error]


def pick(traces: dict[str, list[Span]], trace_id: str | None, slowest: int, route: str | None) -> list[Span]:
    """The roots to explain: those of one trace, or the `slowest` of a route (or of all)."""
    if trace_id is not None:
        return sorted((s for s in traces[trace_id] if s.is_request), key=lambda s: s.start)
    roots = [s for spans in traces.values() for s in spans if s.is_request
             and (route is None or route_of(s).startswith(route))]
    if not roots:
        raise LookupError(f"no requests on route {route!r}" if route else "no requests")
    return sorted(roots, key=lambda s: s.end - s.start, reverse=True)[:slowest]


def table(why: Explanation) -> Table:
    ttft = f", TTFT {ms(why.ttft)}" if why.ttft is not None else ""
    notes = list(why.notes)
    if why.hops:
        notes.insert(1, hops_text(why.hops))
    out = Table(title=f"{why.rid} ({why.route}, trace {why.trace_id}): e2e {ms(why.e2e)}{ttft}, level {why.level}",
                title_justify="left", caption="\n".join(notes) or None, caption_justify="left")
    out.add_column("cause")
    out.add_column("e2e ms", justify="right")
    out.add_column("share", justify="right")
    out.add_column("TTFT ms", justify="right")
    out.add_column("evidence")
    for c in why.causes:
        share = c.e2e / why.e2e if why.e2e else 0.0
        out.add_row(c.name, f"{c.e2e * 1000:.1f}", f"{share:.1%}", f"{c.ttft * 1000:.1f}" if why.ttft else "-",
                    "\n".join(c.evidence))
    return out


def run_view(explanations: list[Explanation]) -> dict:
    """A run's view of the causes: inter-token latency (percentiles over every gap between two
    tokens, and each request's worst stall with what made it), and for TTFT and e2e the share
    of each cause over all requests and over the slowest 1% (one request at least)."""
    from loupe.traces.summary import QUANTILES, percentile

    gaps = sorted(g for e in explanations for g in e.token_gaps)
    stalls = sorted((e for e in explanations if e.stall), key=lambda e: -e.stall[0])
    view: dict = {"inter_token": {key: percentile(gaps, q) for key, q in QUANTILES.items()} if gaps else {},
                  "stalls": [{"rid": e.rid, "trace_id": e.trace_id, "seconds": e.stall[0], "made_by": e.stall[1]}
                             for e in stalls],
                  "causes": {}}
    for metric in ("ttft", "e2e"):
        timed = sorted((e for e in explanations if getattr(e, metric)), key=lambda e: -getattr(e, metric))
        slowest = timed[:max(1, len(timed) // 100)]
        view["causes"][metric] = {group: cause_shares(requests, metric)
                                  for group, requests in (("all", timed), ("slowest 1%", slowest))}
    return view


def cause_shares(explanations: list[Explanation], metric: str) -> dict[str, float]:
    total = sum(getattr(e, metric) for e in explanations) or 1.0
    shares: dict[str, float] = {}
    for e in explanations:
        for c in e.causes:
            shares[c.name] = shares.get(c.name, 0.0) + getattr(c, metric) / total
    return {name: share for name, share in sorted(shares.items(), key=lambda kv: -kv[1]) if share > 0}


def run_tables(view: dict, stalls_shown: int = 5) -> list[Table]:
    out = []
    if view["inter_token"]:
        itl = Table(title="Inter-token latency: " + ", ".join(f"{key} {ms(v)}" for key, v in view["inter_token"].items())
                    + f"; the {min(stalls_shown, len(view['stalls']))} worst stalls", title_justify="left")
        for column in ("request", "stall ms", "what made it"):
            itl.add_column(column, justify="right" if column == "stall ms" else "left")
        for s in view["stalls"][:stalls_shown]:
            itl.add_row(s["rid"], f"{s['seconds'] * 1000:.1f}", s["made_by"])
        out.append(itl)
    causes = Table(title="Causes: their share of TTFT and of e2e (loupe traces why)", title_justify="left")
    causes.add_column("cause")
    columns = [(metric, group) for metric in ("ttft", "e2e") for group in view["causes"][metric]]
    for metric, group in columns:
        causes.add_column(f"{metric}, {group}", justify="right")
    for name in CAUSES:
        shares = [view["causes"][metric][group].get(name) for metric, group in columns]
        if any(shares):
            causes.add_row(name, *("" if s is None else f"{s:.1%}" for s in shares))
    out.append(causes)
    return out
