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
  decode-only step of the same batch size (in the same files), when other requests'
  prefill chunks ran in that step; the requests whose chunks those were are named.
- long contexts: the part beyond that usual step of a decode-only step that attended at
  least twice the usual KV tokens (decode_step's `kv_tokens`: its own and its batch-mates').
- decode: the rest of its decode steps.
- between steps: what its stages leave between their steps (scheduling, sampling output,
  handing tokens on).
- detokenize and stream: the scheduler's last output to the root's end.

Level 3 explains all of these; level 2 has no step spans, so interference stays in decode;
level 1 has only the root's latency attributes.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from rich.table import Table

from loupe.traces.reader import STATUS_ERROR, Span
from loupe.traces.requests import children_by_parent, route_of

CAUSES = ("HTTP and tokenization", "queued", "own prefill", "re-prefill after a retraction", "interference",
          "long contexts", "decode", "between steps", "detokenize and stream", "unexplained")
LONG_CONTEXT = 2  # a decode step attending this many times the usual KV tokens is slowed by long contexts
STEP_SPANS = ("prefill_chunk", "decode_step")


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

    def baseline(self, scheduler: str, size: int) -> tuple[float, float] | None:
        """The median decode-only pass of this scheduler with the nearest batch size: its
        seconds and KV tokens."""
        sizes = self.sizes.get(scheduler)
        if not sizes:
            return None
        nearest = min(sizes, key=lambda s: (abs(s - size), s))
        return self.decode_only[(scheduler, nearest)]

    def in_flight(self, scheduler: str, at: int) -> tuple[int, Batch] | None:
        """The pass this scheduler was running at `at` (epoch ns), with its id."""
        passes = self.timeline.get(scheduler, [])
        i = bisect.bisect_right(passes, at, key=lambda p: p[0]) - 1  # the last pass that began by then
        if i >= 0 and at < passes[i][1]:
            return passes[i][2], self.batches[(scheduler, passes[i][2])]
        return None


def rid_of(root: Span) -> str:
    return str(root.attributes.get("rid", root.name[4:]))


def schedulers(root: Span, children: dict) -> list[Span]:
    """The request's scheduler thread spans, the driver rank (TP 0, PP 0) first."""
    threads = [s for s in children.get(root.span_id, ()) if s.attributes.get("thread_label") == "Scheduler"]
    return sorted(threads, key=lambda s: (s.attributes.get("pp_rank", 0), s.attributes.get("tp_rank", 0)))


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

    def as_dict(self) -> dict:
        return {"trace_id": self.trace_id, "rid": self.rid, "route": self.route, "level": self.level,
                "e2e": self.e2e, "ttft": self.ttft, "notes": self.notes, "stall": self.stall,
                "causes": [{"cause": c.name, "e2e": c.e2e, "ttft": c.ttft, "evidence": c.evidence}
                           for c in self.causes]}


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

    def covered(self) -> tuple[float, float]:
        return (sum(c.e2e for c in self.causes.values()), sum(c.ttft for c in self.causes.values()))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def explain(root: Span, spans: list[Span], passes: Passes) -> Explanation:
    """Where `root`'s request spent its time, as causes (see the module's docstring)."""
    children = passes.children.get(root.trace_id) or children_by_parent(spans)  # a trace the passes were not built from
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
            notes.append("level 2: no step spans, so interference from other requests' prefill stays in decode")
        in_flight = passes.in_flight(thread.name, dispatched)
        line.add("queued", dispatched, thread.start, None if in_flight is None or thread.start - dispatched < 1e6
                 else f"{ms((thread.start - dispatched) / 1e9)} for the forward pass in flight when it arrived "
                      f"(batch {in_flight[0]}: {in_flight[1].mode}, {count(in_flight[1].size, 'request')})")
        explain_stages(rid_of(root), thread, children, passes, line)
        line.add("detokenize and stream", thread.end, root.end)
    e2e, ttft = (root.end - root.start) / 1e9, (first - root.start) / 1e9 if first is not None else None
    covered_e2e, covered_ttft = line.covered()
    unexplained = line.causes["unexplained"]
    unexplained.e2e, unexplained.ttft = max(0.0, e2e - covered_e2e), max(0.0, (ttft or 0.0) - covered_ttft)
    shown = [c for c in line.causes.values() if c.e2e > 0 or c.evidence or c is unexplained]
    causes = sorted(shown, key=lambda c: (c is unexplained, -c.e2e))  # unexplained last, always there
    return Explanation(root.trace_id, rid_of(root), route_of(root), level, e2e, ttft, causes, notes, line.token_gaps,
                       line.stall, line.intervals)


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
            between(stage, steps, line)
        elif stage.name == "decode":
            explain_decode(rid, thread, stage, steps, passes, line)
        else:  # a prefill/decode pair's bootstrap: told apart in a later version; here, waiting
            line.add("queued", stage.start, stage.end, f"{stage.name} {ms(stage.seconds)}")


def explain_decode(rid: str, thread: Span, stage: Span, steps: list[Span], passes: Passes, line: Timeline) -> None:
    """Each step up to the scheduler's usual decode-only step of its batch size is decode; what
    is beyond goes to interference when other requests' prefill chunks ran in it, to long
    contexts when it attended at least LONG_CONTEXT times the usual KV tokens."""
    if not steps:
        line.add("decode", stage.start, stage.end, f"{stage.attributes.get('completion_tokens', '?')} tokens")
        return
    culprits: dict[str, list[float]] = {}  # rid: [extra seconds, steps shared]
    long_steps: list[tuple[float, int, float]] = []  # (extra seconds, KV tokens, usual KV tokens)
    made_by = []  # what made each step as long as it was
    for step in steps:
        batch = passes.batches.get((thread.name, step.attributes.get("batch_id")))
        usual = passes.baseline(thread.name, step.attributes.get("batch_size", 0))
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
    usual = passes.baseline(thread.name, slowest.attributes.get("batch_size", 0))
    line.add("decode", 0, 0, f"{len(steps)} steps, the slowest {ms(slowest.seconds)} (step "
             f"{slowest.attributes.get('step')}, batch {slowest.attributes.get('batch_id')})"
             + (f" against a usual {ms(usual[0])}" if usual is not None else ""))
    between(stage, steps, line)
    ends = [stage.start, *(s.end for s in steps)]  # the first token came as the decode stage began
    line.token_gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(ends)]
    worst = max(range(len(steps)), key=line.token_gaps.__getitem__)
    line.stall = (line.token_gaps[worst], f"step {steps[worst].attributes.get('step')}, {made_by[worst]}")


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
    passes = Passes(traces, each)
    return [explain(root, traces[root.trace_id], passes) for root in each(roots, "explaining requests")]


def explain_succeeded(traces: dict[str, list[Span]],
                      each: Callable[[Collection, str], Iterable] = quietly) -> list[Explanation]:
    """Every request that succeeded (a run's view leaves failed ones out, as the summary's latencies do)."""
    return explain_all(traces, [s for spans in traces.values() for s in spans if s.is_request and s.status != STATUS_ERROR],
                       each)


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
    out = Table(title=f"{why.rid} ({why.route}, trace {why.trace_id}): e2e {ms(why.e2e)}{ttft}, level {why.level}",
                title_justify="left", caption="\n".join(why.notes) or None, caption_justify="left")
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
