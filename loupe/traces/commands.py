"""`loupe traces summary | show | why | export | plot FILE…` and `diff BEFORE… -- AFTER…`: look at the
OTLP JSON lines a server wrote with `--otlp-endpoint file:///path/traces.jsonl`, without a tracing backend."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from loupe.traces import perfetto
from loupe.traces.reader import SpanFile, collector_off, read_files
from loupe.traces.requests import all_requests

PROGRESS_FROM_BYTES = 32 * 2**20  # a progress bar for reading more than this, on a terminal
PROGRESS_FROM_ITEMS = 1_000  # and for walking more traces or requests than this after reading
WIDTH_OFF_TERMINAL = 150  # columns of output to a file or pipe (rich would take 80): ids stay whole


def load(paths: list[str], console: Console) -> SpanFile:
    """Read the files, with a progress bar when they are large; one line and exit 1 when there is
    nothing to read."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"loupe traces: no such file: {missing[0]}")
    size = sum(os.path.getsize(p) for p in paths)
    if size < PROGRESS_FROM_BYTES or not console.is_terminal:
        spans = read_files(paths)
    else:
        columns = (TextColumn("reading spans"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("read", total=size)
            spans = read_files(paths, lambda n: progress.advance(task, n))
    if spans.bad_lines:
        console.print(f"[yellow]skipped {spans.bad_lines} lines that are not OTLP JSON[/yellow]")
    if not spans.traces:
        raise SystemExit("loupe traces: no spans in " + ", ".join(paths))
    return spans


def walker(console: Console) -> Callable[[Collection, str], Iterable]:
    """`each(items, what)` for why's Passes and explain_all: a progress bar saying `what` while
    many traces or requests are walked on a terminal; nothing otherwise."""

    def each(items: Collection, what: str) -> Iterable:
        if len(items) < PROGRESS_FROM_ITEMS or not console.is_terminal:
            return items
        return with_bar(items, what, console)

    return each


def with_bar(items: Collection, what: str, console: Console) -> Iterator:
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield from progress.track(items, total=len(items))


def summary(args: argparse.Namespace, spans: SpanFile, console: Console) -> None:
    from loupe.traces.summary import summarize, tables
    from loupe.traces.why import explain_succeeded, run_tables, run_view

    requests = all_requests(spans.traces, join_pairs=not args.per_server)
    result = summarize(requests, args.slowest)
    view = run_view(explain_succeeded(spans.traces, walker(console)))
    if args.json:
        print(json.dumps({"files": args.files, "traces": len(spans.traces), **result, **view}, indent=2))
        return
    console.print(f"{len(requests)} requests in {len(spans.traces)} traces from {len(args.files)} file(s)")
    for table in [*tables(result), *run_tables(view)]:
        console.print(table)


def show(args: argparse.Namespace, spans: SpanFile, console: Console) -> None:
    from loupe.traces.waterfall import find_trace, waterfall

    trace_id = find_trace(spans.traces, args.trace_id)
    from loupe.traces.why import Passes

    passes = Passes(spans.traces, walker(console))
    console.print(waterfall(spans.traces[trace_id], width=args.bar_width, folded=args.fold, passes=passes))


def why(args: argparse.Namespace, spans: SpanFile, console: Console) -> None:
    from loupe.traces.waterfall import find_trace
    from loupe.traces.why import explain_all, pick, table

    trace_id = find_trace(spans.traces, args.trace_id) if args.trace_id else None
    explanations = explain_all(spans.traces, pick(spans.traces, trace_id, args.slowest or 1, args.route),
                               walker(console))
    if args.json:
        print(json.dumps([e.as_dict() for e in explanations], indent=2))
        return
    for explanation in explanations:
        console.print(table(explanation))


def diff(args: argparse.Namespace, before: SpanFile, after: SpanFile, console: Console) -> None:
    from loupe.traces.diff import Run, compare_runs, tables

    result = compare_runs(Run.read(before.traces), Run.read(after.traces))
    if args.json:
        print(json.dumps({"before": args.files, "after": args.after, **result}, indent=2))
        return
    console.print(f"before: {', '.join(args.files)}; after: {', '.join(args.after)}\n"
                  f"flagged: the {result['confidence']:.0%} interval of the change excludes zero "
                  f"({result['resamples']:,} resamples of each run's requests, seed {result['seed']})")
    for table in tables(result):
        console.print(table)


def export(args: argparse.Namespace, spans: SpanFile, console: Console) -> None:
    traces = spans.traces
    if args.trace_id:
        from loupe.traces.waterfall import find_trace

        trace_id = find_trace(traces, args.trace_id)
        traces = {trace_id: traces[trace_id]}
    with open(args.output, "w") as f:
        json.dump(perfetto.trace_events(traces), f, separators=(",", ":"))
    console.print(f"wrote {args.output}: {len(traces)} traces; open it at https://ui.perfetto.dev or chrome://tracing")


def plot(args: argparse.Namespace, spans: SpanFile, console: Console) -> None:
    from loupe.traces.plot import plot as draw
    from loupe.traces.plot import timeline
    from loupe.traces.why import explain_succeeded

    if args.timeline:
        drawn = timeline(explain_succeeded(spans.traces, walker(console)), args.output)
    else:
        drawn = draw(all_requests(spans.traces), args.output)
    console.print(f"wrote {args.output}: {drawn} requests")


def parser() -> argparse.ArgumentParser:
    from loupe.config import OneLineErrorParser

    top = OneLineErrorParser(prog="loupe traces", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    files = {"nargs": "+", "metavar": "FILE", "help": "OTLP JSON lines files (rotated ones too: traces*.jsonl)"}

    p = commands.add_parser("summary", help="stage latency percentiles and shares, per route and overall")
    p.add_argument("files", **files)
    p.add_argument("--slowest", type=int, default=0, metavar="N", help="also list the N slowest requests")
    p.add_argument("--json", action="store_true", help="print JSON (seconds) instead of tables (ms)")
    p.add_argument("--per-server", action="store_true",
                   help="stage tables with each server's root of a prefill/decode pair on its own (a route each)")
    p.set_defaults(run=summary)

    p = commands.add_parser("show", help="one trace as a terminal waterfall")
    p.add_argument("trace_id", metavar="TRACE_ID", help="a trace id, a unique prefix of one, or a request id")
    p.add_argument("files", **files)
    p.add_argument("--fold", action="store_true", help="one line for each run of decode steps or chunks")
    p.add_argument("--bar-width", type=int, default=40, help="columns of the time axis (default: 40)")
    p.set_defaults(run=show)

    p = commands.add_parser("why", help="where one request's time went, as causes with evidence")
    p.add_argument("files", nargs="+", metavar="[TRACE_ID] FILE",
                   help="a trace id (prefix, or request id) then the files; with --slowest or --route, only files")
    p.add_argument("--slowest", type=int, default=0, metavar="N", help="explain the N slowest requests instead")
    p.add_argument("--route", help="only requests of this route, e.g. /v1/chat/completions (the slowest, or N)")
    p.add_argument("--json", action="store_true", help="print JSON (seconds) instead of tables (ms)")
    p.set_defaults(run=why)

    p = commands.add_parser("diff", help="two runs compared: latencies and causes, flagging the changes beyond luck",
                            usage="loupe traces diff [-h] [--json] BEFORE_FILE… -- AFTER_FILE…",
                            description="Per route and over all requests: TTFT, e2e, inter-token latency and each "
                            "cause's seconds (as `why` finds them), p50/p90/p99 before and after. A change is flagged "
                            "when its 95% bootstrap interval (1,000 resamples of each run's requests) excludes zero.")
    p.add_argument("files", nargs="*", metavar="BEFORE_FILE… -- AFTER_FILE…",
                   help="the first run's files, then after -- the second's")
    p.add_argument("--after", nargs="*", help=argparse.SUPPRESS)  # what main() makes of the bare --
    p.add_argument("--json", action="store_true", help="print JSON (seconds) instead of tables (ms)")

    p = commands.add_parser("export", help="Chrome trace-event JSON for Perfetto or chrome://tracing")
    p.add_argument("files", **files)
    p.add_argument("--format", choices=["perfetto"], default="perfetto", help="perfetto (Chrome trace-event JSON)")
    p.add_argument("-o", "--output", default="traces.perfetto.json", help="default: traces.perfetto.json")
    p.add_argument("--trace-id", help="only this trace (id, prefix or request id)")
    p.set_defaults(run=export)

    p = commands.add_parser("plot", help="a PNG of each request's stages, by arrival")
    p.add_argument("files", **files)
    p.add_argument("-o", "--output", default="traces.png", help="default: traces.png")
    p.add_argument("--timeline", action="store_true", help="time on the x axis, a row per request, coloured by cause")
    p.set_defaults(run=plot)
    return top


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["diff"] and "--" in argv:  # argparse would drop the bare -- that splits the runs
        argv[argv.index("--")] = "--after"
    args = parser().parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = WIDTH_OFF_TERMINAL
    if args.command == "why":  # its first word names the request, unless --slowest or --route picks them
        args.trace_id = None if args.slowest or args.route else args.files.pop(0)
        if not args.files:
            raise SystemExit("loupe traces why: give TRACE_ID FILE… or --slowest N FILE…")
    if args.command == "diff" and not (args.files and args.after):
        missing = ("no -- between the runs" if args.after is None
                   else f"no files {'after' if args.files else 'before'} --")
        raise SystemExit(f"loupe traces diff: {missing}; give BEFORE_FILE… -- AFTER_FILE…")
    with collector_off():  # a command's spans and explanations live until it ends: collecting would find little
        try:
            if args.command == "diff":  # two runs, each read on its own
                diff(args, load(args.files, console), load(args.after, console), console)
            else:
                args.run(args, load(args.files, console), console)
        except LookupError as e:  # a trace id that names no trace, or several
            raise SystemExit(f"loupe traces {args.command}: {e}") from None
