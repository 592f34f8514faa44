"""`loupe traces plot`: a PNG of where each request's time went over a load run.

One bar per request, by arrival, stacked by sequential stage (tokenize, queue, prefill,
decode, other: together its end-to-end time), time to first token marked on each. Failed
requests are left out, as in the summary's latencies.
"""

from __future__ import annotations

from loupe.traces.requests import SEQUENTIAL, RequestTimes

STACKED = (*SEQUENTIAL, "other")
COLORS = {"tokenize": "#b07cc6", "queue": "#e8b931", "prefill": "#3d9bd9", "decode": "#4caf63", "other": "#9e9e9e"}


def plot(requests: list[RequestTimes], path: str, title: str = "Where the time went") -> int:
    """Write the PNG; the number of requests drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
