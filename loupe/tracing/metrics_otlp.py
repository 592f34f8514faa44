"""Snapshots of the HTTP process's metrics (`ipc.MetricsSnapshot`: prometheus_client's
families in plain values) as OTLP `ExportMetricsServiceRequest`s.

Counters become monotonic Sums, gauges Gauges, histograms explicit-bucket Histograms (the
bounds from the `le` labels, each bucket's own count from Prometheus's cumulative ones, the
trace-id exemplars). A series starts at its `_created` time. Cumulative temporality sends
the totals; delta sends what changed since the last export that succeeded (so the counts of
a failed one go with the next), each point starting where that export ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from loupe import ipc
from loupe.tracing.otlp import SdkHttpSender, set_attributes

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


@dataclass
class Series:
    """One series of a family, gathered from its samples."""

    attributes: dict  # a histogram's `le` aside
    value: float = 0.0  # a counter's total, a gauge's value, a histogram's count
    sum: float = 0.0  # a histogram's
    created: float | None = None  # unix seconds
    buckets: list = field(default_factory=list)  # (upper bound, cumulative count, exemplar or None)


def gather(samples: list) -> dict[tuple, Series]:
    """A family's samples by series, keyed by their sorted attributes."""
    series: dict[tuple, Series] = {}
    for suffix, labels, value, exemplar in samples:
        attributes = {k: v for k, v in labels.items() if k != "le"}
        key = tuple(sorted(attributes.items()))
        one = series.get(key)
        if one is None:
            one = series[key] = Series(attributes)
        if suffix == "_bucket":
            one.buckets.append((float(labels["le"]), value, exemplar))
        elif suffix == "_created":
            one.created = value
        elif suffix == "_sum":
            one.sum = value
        else:  # "", "_total", "_count"
            one.value = value
    return series


class MetricsEncoder:
    """Snapshots -> ExportMetricsServiceRequests (one resource, scope "loupe"). With `delta`,
    call `commit()` once an export succeeded: the next one counts from there."""

    def __init__(self, resource_attributes: Mapping[str, object], delta: bool) -> None:
        self.resource = Resource()
        set_attributes(self.resource.attributes, resource_attributes)
        self.scope = InstrumentationScope(name="loupe")
        self.delta = delta
        self.temporality = DELTA if delta else CUMULATIVE
        self.first_seen: dict[tuple, int] = {}  # start of series without a _created sample
        # delta: by series, (end of its last exported point, its start, its totals then)
        self.exported: dict[tuple, tuple[int, int, tuple]] = {}
        self.pending: dict[tuple, tuple[int, int, tuple]] = {}
        # A restarted exporter's first snapshot is not the server's first: in delta, its totals
        # were sent (or lost) before; from it the next ones count, and it sends its gauges only.
        self.baseline_only = False
        self.encoded = 0
        self.add_point = {"counter": self.add_counter, "gauge": self.add_gauge, "histogram": self.add_histogram}

    def encode(self, snapshot: ipc.MetricsSnapshot) -> ExportMetricsServiceRequest:
        self.baseline_only = self.delta and self.encoded == 0 and snapshot.number > 0
        self.encoded += 1
        self.pending = {}
        request = ExportMetricsServiceRequest()
        resource_metrics = request.resource_metrics.add()
        resource_metrics.resource.CopyFrom(self.resource)
        scope_metrics = resource_metrics.scope_metrics.add()
        scope_metrics.scope.CopyFrom(self.scope)
        for family in snapshot.families:
            add_point = self.add_point.get(family.kind)
            if add_point is None:  # loupe has no summaries, infos or state sets
                continue
            metric = Metric(name=family.name, description=family.description, unit=family.unit)
            for key, series in gather(family.samples).items():
                add_point(metric, (family.name, *key), series, snapshot.time_ns)
            if metric.WhichOneof("data"):  # not a labelled family without series yet
                scope_metrics.metrics.append(metric)
        if self.baseline_only:
            self.commit()  # whether or not this export succeeds: the totals before it were not ours to send
        return request

    def commit(self) -> None:
        self.exported.update(self.pending)

    def add_gauge(self, metric: Metric, key: tuple, series: Series, now: int) -> None:
        point = metric.gauge.data_points.add(time_unix_nano=now, as_double=series.value)
        set_attributes(point.attributes, series.attributes)

    def add_counter(self, metric: Metric, key: tuple, series: Series, now: int) -> None:
        start, values = self.change(key, series, now, (series.value,))
        if start is None:
            return
        metric.sum.is_monotonic = True
        metric.sum.aggregation_temporality = self.temporality
        point = metric.sum.data_points.add(start_time_unix_nano=start, time_unix_nano=now, as_double=values[0])
        set_attributes(point.attributes, series.attributes)

    def add_histogram(self, metric: Metric, key: tuple, series: Series, now: int) -> None:
        buckets = sorted(series.buckets, key=lambda bucket: bucket[0])  # the last one is +Inf
        cumulative = [count for _, count, _ in buckets]
        counts = [cumulative[0], *(b - a for a, b in pairwise(cumulative))]
        start, values = self.change(key, series, now, (series.value, series.sum, *counts))
        if start is None:
            return
        metric.histogram.aggregation_temporality = self.temporality
        count, total, *counts = values
        point = metric.histogram.data_points.add(
            start_time_unix_nano=start, time_unix_nano=now, count=round(count), sum=total,
            bucket_counts=[round(c) for c in counts], explicit_bounds=[bound for bound, _, _ in buckets[:-1]])
        set_attributes(point.attributes, series.attributes)
        for _, _, exemplar in buckets:
            if exemplar is not None:
                add_exemplar(point, exemplar, start, now)

    def change(self, key: tuple, series: Series, now: int, totals: tuple) -> tuple[int | None, tuple]:
        """A point's start and values: the series' totals since it began, or in delta what
        changed since its last export (all of it for a series new since). No start: nothing
        to send (a restarted exporter's baseline)."""
        start = round(series.created * 1e9) if series.created is not None else self.first_seen.setdefault(key, now)
        if not self.delta:
            return start, totals
        self.pending[key] = (now, start, totals)
        if self.baseline_only:
            return None, totals
        last = self.exported.get(key)
        if last is None or last[1] != start:
            return start, totals
        return last[0], tuple(now_total - then for now_total, then in zip(totals, last[2], strict=True))


def add_exemplar(point, exemplar: tuple, since: int, now: int) -> None:
    """A bucket's exemplar (labels, value, unix seconds) on `point`, unless it was observed
    before the point's start (in delta, it belongs to an earlier one)."""
    labels, value, at = exemplar
    at = round(at * 1e9) if at else now
    if at < since:
        return
    attributes = dict(labels)
    trace_id = attributes.pop("trace_id", None)
    sample = point.exemplars.add(time_unix_nano=at, as_double=value)
    if trace_id:
        sample.trace_id = bytes.fromhex(trace_id)
    set_attributes(sample.filtered_attributes, attributes)


class HttpMetricExporter(SdkHttpSender, OTLPMetricExporter):
    """The SDK's OTLP/HTTP metric exporter, sending ExportMetricsServiceRequests built here."""
