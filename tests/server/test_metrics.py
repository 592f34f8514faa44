"""The span exporter's counters as /metrics shows them: running totals per exporter process,
and what a dead exporter held counted as dropped."""

from loupe.ipc import ExporterStats
from loupe.server.metrics import Metrics


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_a_dead_exporters_held_spans_count_as_dropped_and_a_new_one_counts_afresh():
    metrics = Metrics()
    metrics.set_exporter_stats(ExporterStats(exported=100, dropped=2, failed=0, pid=11, queued=30))
    metrics.set_exporter_stats(ExporterStats(exported=150, dropped=2, failed=1, pid=11, queued=37))
    assert sample(metrics, "loupe_tracing_spans_exported_total") == 150
    assert sample(metrics, "loupe_tracing_spans_queued") == 37

    metrics.exporter_died(restarted=True)
    assert sample(metrics, "loupe_tracing_spans_dropped_total") == 2 + 37
    assert sample(metrics, "loupe_tracing_spans_queued") == 0
    assert sample(metrics, "loupe_tracing_exporter_restarts_total") == 1

    # A last report of the dead one, still on its way, changes no total.
    metrics.set_exporter_stats(ExporterStats(exported=150, dropped=2, failed=1, pid=11, queued=0))
    assert sample(metrics, "loupe_tracing_spans_exported_total") == 150
    # The new exporter's totals start from zero and add to the counters.
    metrics.set_exporter_stats(ExporterStats(exported=5, dropped=0, failed=0, pid=12, queued=3))
    assert sample(metrics, "loupe_tracing_spans_exported_total") == 155
    assert sample(metrics, "loupe_tracing_spans_dropped_total") == 39

    metrics.exporter_died(restarted=False)  # the last one: not started again
    assert sample(metrics, "loupe_tracing_spans_dropped_total") == 42
    assert sample(metrics, "loupe_tracing_exporter_restarts_total") == 1
