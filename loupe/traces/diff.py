"""`loupe traces diff BEFORE… -- AFTER…`: what changed between two runs, and whether it is more
than the luck of which requests each run happened to have.

Per route (when there are several) and over all requests, for TTFT, e2e, inter-token latency
(every gap between two tokens, pooled over the requests) and each cause of `loupe traces why`
(a request's seconds of it in its e2e and in its TTFT; a cause it lacks counts 0): the p50,
p90 and p99 of each run, and the change. Failed requests are counted, not timed; causes that
neither run has are left out.

The change's interval is a percentile bootstrap: each run's requests are resampled with
replacement RESAMPLES times (a fixed seed: the same files give the same output), the
percentile is taken of each resample (a request's token gaps travel with it), and the
interval is the middle CONFIDENCE of the after-minus-before differences. A change is flagged
when its interval excludes zero: resampling either run rarely undoes it. A percentile gets no
interval (and no flag) when a run has fewer than MIN_REQUESTS requests with the measure or
too few values to have one beyond it (a p99 needs 100). Each row is tested on its own, so
among many unchanged rows about one in twenty may be flagged by chance.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from rich.table import Table

from loupe.traces.reader import STATUS_ERROR, Span
from loupe.traces.requests import route_of
from loupe.traces.summary import QUANTILES
from loupe.traces.why import CAUSES, Explanation, count, explain_succeeded

RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95
MIN_REQUESTS = 5  # with fewer on a side, resamples hardly differ from the run: no interval, no flag
PERCENTS = [100 * q for q in QUANTILES.values()]
# (metric, cause): the headline latencies, then each cause's seconds in TTFT and in e2e
MEASURES = [("ttft", None), ("e2e", None), ("inter_token", None),
            *((metric, cause) for cause in CAUSES for metric in ("ttft", "e2e"))]
NAMES = {"ttft": "TTFT", "e2e": "e2e", "inter_token": "inter-token"}


@dataclass
class Run:
    """One run's requests that succeeded, explained, and how many failed on each route."""

    explanations: list[Explanation]
    failed: Counter[str]

    @classmethod
    def read(cls, traces: dict[str, list[Span]]) -> Run:
        failed = Counter(route_of(s) for spans in traces.values() for s in spans
                         if s.is_request and s.status == STATUS_ERROR)
        return cls(explain_succeeded(traces), failed)

    def on(self, route: str) -> Run:
        return Run([e for e in self.explanations if e.route == route], Counter({route: self.failed[route]}))

    def counts(self) -> dict[str, int]:
        errors = sum(self.failed.values())
        return {"requests": len(self.explanations) + errors, "errors": errors}


def values(e: Explanation, metric: str, cause: str | None) -> list[float]:
    """What one request gives a measure: its TTFT or e2e, its seconds of a cause in either, or
    its gaps between tokens; nothing for a TTFT it does not have."""
    if metric == "inter_token":
        return e.token_gaps
    if metric == "ttft" and e.ttft is None:
        return []
    if cause is None:
        return [getattr(e, metric)]
    return [next((getattr(c, metric) for c in e.causes if c.name == cause), 0.0)]


def resampled(requests: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The percentiles of each of RESAMPLES resamples of the requests, their values pooled:
    an array of (resample, percentile)."""
    n = len(requests)
    if all(len(v) == 1 for v in requests):  # one value a request: every resample at once
        picks = np.concatenate(requests)[rng.integers(0, n, (RESAMPLES, n))]
        return np.percentile(picks, PERCENTS, axis=1).T
    pooled, owner = np.concatenate(requests), np.repeat(np.arange(n), [len(v) for v in requests])
    out = np.empty((RESAMPLES, len(PERCENTS)))
    for i in range(RESAMPLES):
        times_picked = np.bincount(rng.integers(0, n, n), minlength=n)
        out[i] = np.percentile(np.repeat(pooled, times_picked[owner]), PERCENTS)
    return out


def intervals(before: list[np.ndarray], after: list[np.ndarray], rng: np.random.Generator) -> list:
    """The interval of each percentile's change, or None where a run has too few requests or no
    value beyond the percentile (a p99 needs 100): its resamples would be little more than the
    run's largest value."""
    if min(len(before), len(after)) < MIN_REQUESTS:
        return [None] * len(PERCENTS)
    tail = 50 * (1 - CONFIDENCE)
    low, high = np.percentile(resampled(after, rng) - resampled(before, rng), [tail, 100 - tail], axis=0)
    fewest = min(sum(map(len, before)), sum(map(len, after)))
    return [[float(lo), float(hi)] if fewest * (1 - q) >= 1 else None
            for q, lo, hi in zip(QUANTILES.values(), low, high, strict=True)]


def compare(before: Run, after: Run, rng: np.random.Generator) -> dict:
    """Each measure's percentiles before and after, the change, its interval and flag."""
    rows = []
    for metric, cause in MEASURES:
        # to the µs: the causes of a request are sums of spans' ns, whose float dust (an unexplained
        # 1e-12 s) would otherwise read as a change
        sides = [[np.round(v, 6) for e in run.explanations if (v := values(e, metric, cause))]
                 for run in (before, after)]
        if not all(sides) or (cause and not any(v.any() for side in sides for v in side)):
            continue
        was, now = (np.percentile(np.concatenate(side), PERCENTS) for side in sides)
        for key, b, a, interval in zip(QUANTILES, was, now, intervals(*sides, rng), strict=True):
            rows.append({"metric": metric, "cause": cause, "quantile": key, "before": float(b), "after": float(a),
                         "change": float(a - b), "interval": interval,
                         "flagged": interval is not None and (interval[0] > 0 or interval[1] < 0)})
    return {"before": before.counts(), "after": after.counts(), "rows": rows}


def compare_runs(before: Run, after: Run) -> dict:
    """Both runs compared over all requests and on each route (seconds)."""
    rng = np.random.default_rng(SEED)
    routes = sorted({e.route for run in (before, after) for e in run.explanations} | before.failed.keys()
                    | after.failed.keys())
    overall = compare(before, after, rng)
    per_route = (dict.fromkeys(routes, overall) if len(routes) == 1
                 else {route: compare(before.on(route), after.on(route), rng) for route in routes})
    return {"resamples": RESAMPLES, "seed": SEED, "confidence": CONFIDENCE, "overall": overall, "routes": per_route}


def ms(seconds: float, sign: str = "") -> str:
    return f"{seconds * 1000:{sign}.1f}"


def group_table(title: str, group: dict) -> Table:
    """Every percentile of TTFT, e2e and inter-token latency (dim where not flagged), and only
    the flagged ones of causes; the caption names the causes with nothing flagged."""
    before, after = group["before"], group["after"]
    table = Table(title=f"{title}: {count(before['requests'], 'request')} before ({count(before['errors'], 'error')}), "
                        f"{after['requests']} after ({count(after['errors'], 'error')})", title_justify="left")
    for column in ("measure", "", "before ms", "after ms", "change ms", f"{CONFIDENCE:.0%} interval ms", "flag"):
        table.add_column(column, justify="left" if column in ("measure", "", "flag") else "right")
    hidden, flagged_causes = 0, set()
    for row in group["rows"]:
        cause = row["cause"]
        if cause is not None and not row["flagged"]:
            hidden += 1
            continue
        flagged_causes.add(cause)
        longer = row["change"] > 0
        ratio = row["after"] / row["before"] if row["before"] else None
        percent = "" if ratio is None else f" ({ratio - 1:+.0%})" if ratio < 10 else f" (×{ratio:,.0f})"
        interval = row["interval"]
        table.add_row(f"{cause} ({NAMES[row['metric']]})" if cause else NAMES[row["metric"]], row["quantile"],
                      ms(row["before"]), ms(row["after"]), ms(row["change"], "+") + percent,
                      f"{ms(interval[0], '+')} to {ms(interval[1], '+')}" if interval else "-",
                      ("longer" if longer else "shorter") if row["flagged"] else "",
                      style=("red" if longer else "green") if row["flagged"] else "dim")
    quiet = [c for c in dict.fromkeys(row["cause"] for row in group["rows"]) if c and c not in flagged_causes]
    if hidden:
        table.caption = (f"{hidden} rows of causes not flagged are not shown"
                         + (f"; nothing flagged in {', '.join(quiet)}" if quiet else ""))
        table.caption_justify = "left"
    return table


def tables(result: dict) -> list[Table]:
    """Each route's table (when there are several), then all requests'."""
    groups = list(result["routes"].items()) if len(result["routes"]) > 1 else []
    return [group_table(title, group) for title, group in [*groups, ("All requests", result["overall"])]]
