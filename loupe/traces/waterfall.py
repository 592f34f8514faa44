"""`loupe traces show`: one trace as a terminal waterfall.

Every span of every process (both servers of a prefill/decode pair too) on one time axis
from the trace's first span, nested under its parent, children by start: its offset and
duration in ms, a bar, and the attributes that explain it.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from loupe.traces.reader import STATUS_ERROR, Span
from loupe.traces.requests import children_by_parent, hops_text, pairs, route_of
from loupe.traces.why import STEP_SPANS, Passes, rid_of

KEY_ATTRIBUTES = ("gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens", "gen_ai.usage.cached_tokens",
                  "error.type", "disaggregation.role", "bootstrap_room", "finish_reason", "num_tokens",
                  "cached_tokens", "start_position", "step", "batch_id", "batch_size", "completion_tokens",
                  "busy_seconds", "retracted", "dp_rank", "bytes", "pages", "backend")
SHORT = {"gen_ai.usage.prompt_tokens": "prompt", "gen_ai.usage.completion_tokens": "completion",
         "gen_ai.usage.cached_tokens": "cached", "disaggregation.role": "role"}
SHARED_NAMED = 3  # a step names this many of the requests whose prefill ran with it
COLORS = {"Req": "bold", "queue": "yellow", "prefill": "cyan", "prefill_chunk": "cyan", "decode": "green",
          "decode_step": "green", "tokenize": "magenta", "detokenize": "magenta", "dispatch": "blue"}


def find_trace(traces: dict[str, list[Span]], wanted: str) -> str:
    """The trace id that `wanted` names: a trace id, a unique prefix of one, or a request id."""
    wanted = wanted.lower().removeprefix("req ")
    if wanted in traces:
        return wanted
    matches = {t for t in traces if t.startswith(wanted)}
    matches |= {t for t, spans in traces.items() for s in spans if s.is_request and str(s.attributes.get("rid")).lower() == wanted}
    if len(matches) != 1:
        raise LookupError(f"{len(matches) or 'no'} traces match {wanted!r}")
    return matches.pop()


def label(span: Span) -> str:
    if span.is_request:
        return f"{span.name} {route_of(span)}"
    name = span.name.split(" (host:")[0]
    pid = span.attributes.get("pid")
    return f"{name} pid {pid}" if pid is not None and "thread_label" in span.attributes else name


def details(span: Span) -> str:
    keys = [k for k in KEY_ATTRIBUTES if k in span.attributes]
    if "thread_label" in span.attributes:  # its ranks are in its name
        keys = [k for k in keys if not k.endswith("_rank")]
    parts = [f"{SHORT.get(k, k)}={span.attributes[k]}" for k in keys]
    if span.status == STATUS_ERROR:
        parts.append(f"ERROR {span.status_message}".strip())
    return " ".join(parts)


def fold(spans: list[Span], children: dict) -> list[tuple[Span, int, Span]]:
    """Runs of childless siblings of one name as one (span spanning the run, count, its
    slowest span)."""
    out: list[tuple[Span, int, Span]] = []
    for span in spans:
        last = out[-1][0] if out else None
        if last and last.name == span.name and not children.get(span.span_id) and not children.get(last.span_id):
            merged = Span(last.trace_id, last.span_id, last.parent_id, last.name, last.start, max(last.end, span.end),
                          last.kind, {}, [], max(last.status, span.status))
            out[-1] = (merged, out[-1][1] + 1, max(out[-1][2], span, key=lambda s: s.seconds))
        else:
            out.append((span, 1, span))
    return out


def ordered_rows(spans: list[Span], folded: bool) -> list[tuple[str, Span, int, Span]]:
    """(tree prefix, span, how many it stands for, the slowest of those), depth first,
    children by start."""
    ids = {s.span_id for s in spans}
    children = children_by_parent(spans)
    for siblings in children.values():
        siblings.sort(key=lambda s: (s.start, -s.end))
    tops = sorted((s for s in spans if s.parent_id not in ids), key=lambda s: (s.start, -s.end))
    rows: list[tuple[str, Span, int, Span]] = []

    def walk(level: list[Span], indent: str, top: bool) -> None:
        items = fold(level, children) if folded else [(s, 1, s) for s in level]
        for i, (span, count, slowest) in enumerate(items):
            last = i == len(items) - 1
            rows.append((indent + ("" if top else "└─ " if last else "├─ "), span, count, slowest))
            walk(children.get(span.span_id, []), indent + ("" if top else "   " if last else "│  "), False)

    walk(tops, "", True)
    return rows


def bar(span: Span, origin: int, total: int, width: int) -> Text:
    first = int((span.start - origin) / total * width)
    last = max(first + 1, round((span.end - origin) / total * width))
    color = "red" if span.status == STATUS_ERROR else COLORS.get(span.name.split(" ")[0], "white")
    return Text(" " * first) + Text("█" * (min(last, width) - first), style=color)


def pass_of(step: Span, by_id: dict[str, Span], passes: Passes) -> str:
    """What ran with a step, from its pass's `schedule` event and the file's other traces: the
    pass's mode and size, and the other requests' prefill chunks in it."""
    stage = by_id.get(step.parent_id)
    thread = by_id.get(stage.parent_id) if stage else None
    root = by_id.get(thread.parent_id) if thread else None
    batch = passes.batches.get((thread.name, step.attributes.get("batch_id"))) if thread else None
    if batch is None or root is None:
        return ""
    others = [(rid, n) for rid, n in batch.chunks if rid != rid_of(root)]
    shared = ", ".join(f"{rid} prefill {n}" for rid, n in others[:SHARED_NAMED])
    more = f" and {len(others) - SHARED_NAMED} more" if len(others) > SHARED_NAMED else ""
    return f"{batch.mode}" + (f" with {shared}{more}" if others else "")


def row_details(span: Span, count: int, slowest: Span, by_id: dict[str, Span], passes: Passes | None) -> str:
    if count > 1:  # a folded run: where its slowest was
        where = " ".join(f"{k}={slowest.attributes[k]}" for k in ("step", "batch_id") if k in slowest.attributes)
        return f"slowest {slowest.seconds * 1000:.2f} ms {where}".strip()
    text = details(span)
    if passes is not None and span.name in STEP_SPANS and "batch_id" in span.attributes:
        text = f"{text} {pass_of(span, by_id, passes)}".strip()
    return text


def waterfall(spans: list[Span], width: int = 40, folded: bool = False, passes: Passes | None = None) -> Table:
    """The trace's waterfall; with `passes` (of the files it came from), each step names what
    ran with it."""
    origin = min(s.start for s in spans)
    total = max(max(s.end for s in spans) - origin, 1)
    joined = [f"prefill/decode pair, room {p.decode.attributes.get('bootstrap_room')}: {hops_text(p.hops())}"
              for p in pairs(spans, children_by_parent(spans))]
    table = Table(title=f"trace {spans[0].trace_id}: {len(spans)} spans, {total / 1e6:.1f} ms",
                  title_justify="left", box=None, pad_edge=False, caption="\n".join(joined) or None,
                  caption_justify="left")
    by_id = {s.span_id: s for s in spans}
    rows = [(prefix + label(span) + (f" ×{count}" if count > 1 else ""), f"{(span.start - origin) / 1e6:.2f}",
             f"{(span.end - span.start) / 1e6:.2f}", bar(span, origin, total, width),
             row_details(span, count, slowest, by_id, passes))
            for prefix, span, count, slowest in ordered_rows(spans, folded)]
    for i, heading in enumerate(("span", "start ms", "ms")):  # never cut: on a narrow terminal the details wrap
        table.add_column(heading, justify="left" if i == 0 else "right", no_wrap=True,
                         min_width=max(len(heading), *(len(row[i]) for row in rows)))
    table.add_column("", min_width=width, no_wrap=True)
    table.add_column("")
    for row in rows:
        table.add_row(*row)
    return table
