"""`loupe traces show`: one trace as a terminal waterfall.

Every span of every process (both servers of a prefill/decode pair too) on one time axis
from the trace's first span, nested under its parent, children by start: its offset and
duration in ms, a bar, and the attributes that explain it.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from loupe.traces.reader import STATUS_ERROR, Span
from loupe.traces.requests import children_by_parent, route_of

KEY_ATTRIBUTES = ("gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens", "gen_ai.usage.cached_tokens",
                  "error.type", "disaggregation.role", "bootstrap_room", "finish_reason", "num_tokens",
                  "cached_tokens", "start_position", "step", "batch_id", "batch_size", "completion_tokens",
                  "busy_seconds", "retracted", "dp_rank", "bytes", "pages", "backend")
SHORT = {"gen_ai.usage.prompt_tokens": "prompt", "gen_ai.usage.completion_tokens": "completion",
         "gen_ai.usage.cached_tokens": "cached", "disaggregation.role": "role"}
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


def fold(spans: list[Span], children: dict) -> list[tuple[Span, int]]:
    """Runs of childless siblings of one name as one (first span, count) spanning the run."""
    out: list[tuple[Span, int]] = []
    for span in spans:
        last = out[-1][0] if out else None
        if last and last.name == span.name and not children.get(span.span_id) and not children.get(last.span_id):
            merged = Span(last.trace_id, last.span_id, last.parent_id, last.name, last.start, max(last.end, span.end),
                          last.kind, {}, [], max(last.status, span.status))
            out[-1] = (merged, out[-1][1] + 1)
        else:
            out.append((span, 1))
    return out


def ordered_rows(spans: list[Span], folded: bool) -> list[tuple[str, Span, int]]:
    """(tree prefix, span, how many it stands for), depth first, children by start."""
    ids = {s.span_id for s in spans}
    children = children_by_parent(spans)
    for siblings in children.values():
        siblings.sort(key=lambda s: (s.start, -s.end))
    tops = sorted((s for s in spans if s.parent_id not in ids), key=lambda s: (s.start, -s.end))
    rows: list[tuple[str, Span, int]] = []

    def walk(level: list[Span], indent: str, top: bool) -> None:
        items = fold(level, children) if folded else [(s, 1) for s in level]
        for i, (span, count) in enumerate(items):
            last = i == len(items) - 1
            rows.append((indent + ("" if top else "└─ " if last else "├─ "), span, count))
            walk(children.get(span.span_id, []), indent + ("" if top else "   " if last else "│  "), False)

    walk(tops, "", True)
    return rows


def bar(span: Span, origin: int, total: int, width: int) -> Text:
    first = int((span.start - origin) / total * width)
    last = max(first + 1, round((span.end - origin) / total * width))
    color = "red" if span.status == STATUS_ERROR else COLORS.get(span.name.split(" ")[0], "white")
    return Text(" " * first) + Text("█" * (min(last, width) - first), style=color)


def waterfall(spans: list[Span], width: int = 40, folded: bool = False) -> Table:
    origin = min(s.start for s in spans)
    total = max(max(s.end for s in spans) - origin, 1)
    table = Table(title=f"trace {spans[0].trace_id}: {len(spans)} spans, {total / 1e6:.1f} ms",
                  title_justify="left", box=None, pad_edge=False)
    rows = [(prefix + label(span) + (f" ×{count}" if count > 1 else ""), f"{(span.start - origin) / 1e6:.2f}",
             f"{(span.end - span.start) / 1e6:.2f}", bar(span, origin, total, width), details(span) if count == 1 else "")
            for prefix, span, count in ordered_rows(spans, folded)]
    for i, heading in enumerate(("span", "start ms", "ms")):  # never cut: on a narrow terminal the details wrap
        table.add_column(heading, justify="left" if i == 0 else "right", no_wrap=True,
                         min_width=max(len(heading), *(len(row[i]) for row in rows)))
    table.add_column("", min_width=width, no_wrap=True)
    table.add_column("")
    for row in rows:
        table.add_row(*row)
    return table
