"""`loupe traces summary`: request counts, stage latency percentiles and each stage's share
of end-to-end time, per route and overall; the slowest requests and what dominated them.

Latencies are over the requests that succeeded (failed ones are counted, not timed);
percentiles interpolate linearly between the closest ranks. A stage's share is its total
time over the total end-to-end time of the requests that have that stage.
"""

from __future__ import annotations

from rich.table import Table

from loupe.traces.requests import STAGES, RequestTimes

METRICS = ("ttft", "e2e", *STAGES)
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def percentile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def metric(request: RequestTimes, name: str) -> float | None:
    return getattr(request, name) if name in ("ttft", "e2e") else request.stages[name]


def summarize_group(requests: list[RequestTimes]) -> dict:
    ok = [r for r in requests if not r.error]
    seconds, shares = {}, {}
    for name in METRICS:
        known = [(v, r.e2e) for r in ok if (v := metric(r, name)) is not None]
        if not known:
            continue
        ordered = sorted(v for v, _ in known)
        seconds[name] = {"count": len(ordered), "mean": sum(ordered) / len(ordered),
                         **{key: percentile(ordered, q) for key, q in QUANTILES.items()}}
        if name in STAGES:
            total = sum(e2e for _, e2e in known)
            shares[name] = sum(ordered) / total if total else 0.0
    return {"requests": len(requests), "errors": len(requests) - len(ok), "seconds": seconds, "share_of_e2e": shares}


def slowest(requests: list[RequestTimes], n: int) -> list[dict]:
    out = []
    for r in sorted(requests, key=lambda r: r.e2e, reverse=True)[:n]:
        stage, seconds = r.dominant
        out.append({"trace_id": r.trace_id, "rid": r.rid, "route": r.route, "error": r.error, "e2e": r.e2e,
                    "ttft": r.ttft, "dominant_stage": stage, "dominant_seconds": seconds,
                    "dominant_share": seconds / r.e2e if r.e2e else 0.0})
    return out


def summarize(requests: list[RequestTimes], slowest_n: int = 0) -> dict:
    routes: dict[str, list[RequestTimes]] = {}
    for r in requests:
        routes.setdefault(r.route, []).append(r)
    return {"overall": summarize_group(requests),
            "routes": {route: summarize_group(rs) for route, rs in sorted(routes.items())},
            "slowest": slowest(requests, slowest_n)}


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def group_table(title: str, group: dict) -> Table:
    table = Table(title=f"{title}: {group['requests']} requests, {group['errors']} errors", title_justify="left")
    table.add_column("stage")
    for column in (*QUANTILES, "mean"):
        table.add_column(f"{column} ms", justify="right")
    table.add_column("share of e2e", justify="right")
    for name, stats in group["seconds"].items():
        share = group["share_of_e2e"].get(name)
        table.add_row(name, *(ms(stats[c]) for c in (*QUANTILES, "mean")),
                      "" if share is None else f"{share:.1%}")
    return table


def slowest_table(rows: list[dict]) -> Table:
    table = Table(title=f"The {len(rows)} slowest requests", title_justify="left")
    table.add_column("trace id", no_wrap=True, min_width=32)  # whole: it is what `loupe traces show` takes
    table.add_column("request", no_wrap=True, overflow="ellipsis", max_width=20)
    table.add_column("route", no_wrap=True, overflow="ellipsis", max_width=22)
    for column in ("e2e ms", "ttft ms"):
        table.add_column(column, justify="right", no_wrap=True, min_width=8)
    table.add_column("dominant stage", min_width=12)
    for row in rows:
        dominant = f"{row['dominant_stage']} {ms(row['dominant_seconds'])} ms ({row['dominant_share']:.0%})"
        table.add_row(row["trace_id"], row["rid"] + (" (error)" if row["error"] else ""), row["route"],
                      ms(row["e2e"]), ms(row["ttft"]), dominant)
    return table


def tables(summary: dict) -> list[Table]:
    """The summary as rich tables: each route (when there are several), all requests, the slowest."""
    out = []
    if len(summary["routes"]) > 1:
        out.extend(group_table(route, group) for route, group in summary["routes"].items())
    out.append(group_table("All requests", summary["overall"]))
    if summary["slowest"]:
        out.append(slowest_table(summary["slowest"]))
    return out
