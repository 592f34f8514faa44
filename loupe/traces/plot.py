"""`loupe traces plot`: a PNG of where each request's time went over a load run.

One bar per request, by arrival, stacked by sequential stage (tokenize, queue, prefill,
decode, other: together its end-to-end time), time to first token marked on each. With
`--timeline`, time runs along the x axis instead: a row per request (its id), coloured by
`loupe traces why`'s causes where they happened, so that overlap (a long prefill and the
streams it slowed) is seen at a glance. Failed requests are left out, as in the summary's
latencies.
"""

from __future__ import annotations

from loupe.traces.requests import SEQUENTIAL, RequestTimes
from loupe.traces.why import CAUSES, Explanation

STACKED = (*SEQUENTIAL, "other")
COLORS = {"tokenize": "#b07cc6", "queue": "#e8b931", "prefill": "#3d9bd9", "bootstrap": "#8d6e63",
          "kv transfer": "#26a69a", "decode": "#4caf63", "other": "#9e9e9e"}
CAUSE_COLORS = dict(zip(CAUSES, ("#607d8b", "#b07cc6", "#e8b931", "#3d9bd9", "#1f5f8b", "#8d6e63", "#26a69a",
                                 "#fdd835", "#e0463c", "#f08c2e", "#4caf63", "#c5e1a5", "#7e57c2", "#ffffff"),
                        strict=True))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(requests: list[RequestTimes], path: str, title: str = "Where the time went") -> int:
    """Write the PNG; the number of requests drawn."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    ok = [r for r in requests if not r.error]
    x = range(len(ok))
    fig, ax = plt.subplots(figsize=(max(7.5, min(24.0, len(ok) * 0.12 + 5.5)), 4.5), dpi=120)
    bottom = [0.0] * len(ok)
    for stage in STACKED:
        heights = [(r.stages[stage] or 0.0) * 1000 for r in ok]
        ax.bar(x, heights, bottom=bottom, width=0.85, color=COLORS[stage], label=stage, linewidth=0)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ttft = [(i, r.ttft * 1000) for i, r in enumerate(ok) if r.ttft is not None]
    if ttft:
        ax.scatter(*zip(*ttft, strict=True), marker="_", color="black", s=40, label="time to first token", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("request, in order of arrival")
    ax.set_ylabel("ms")
    errors = len(requests) - len(ok)
    ax.set_title(f"{title}: {len(ok)} requests" + (f" ({errors} failed, not drawn)" if errors else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    ax.margins(x=0.01)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(ok)


def timeline(explanations: list[Explanation], path: str, title: str = "Where the time went, over time") -> int:
    """Write the timeline PNG (a row per request, by arrival); the number of requests drawn."""
    plt = pyplot()
    rows = sorted(explanations, key=lambda e: min((i[0] for i in e.intervals), default=0))
    origin = min((i[0] for e in rows for i in e.intervals), default=0)
    fig, ax = plt.subplots(figsize=(12.0, max(3.0, min(40.0, len(rows) * 0.28 + 1.5))), dpi=120)
    seen = set()
    for y, e in enumerate(rows):
        by_cause: dict[str, list[tuple[float, float]]] = {}
        for start, end, cause in e.intervals:
            by_cause.setdefault(cause, []).append(((start - origin) / 1e6, (end - start) / 1e6))
        for cause, bars in by_cause.items():
            ax.broken_barh(bars, (y - 0.4, 0.8), color=CAUSE_COLORS[cause], label=None if cause in seen else cause)
            seen.add(cause)
    ax.set_yticks(range(len(rows)), [e.rid[:24] for e in rows], fontsize="x-small")
    ax.invert_yaxis()  # the first arrival on top
    ax.set_xlabel("ms from the first request's arrival")
    ax.set_title(f"{title}: {len(rows)} requests")
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: CAUSES.index(labels[i]))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(rows)
