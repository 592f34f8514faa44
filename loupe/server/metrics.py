"""Prometheus metrics of the server, served at /metrics and, with OTEL_METRICS_EXPORTER=otlp,
pushed as snapshots to the metrics exporter process (tracing/metrics_exporter.py)."""

from __future__ import annotations

import dataclasses
import threading
import time

import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from loupe import ipc
from loupe.ipc import ExporterStats, SchedulerStats

SHORT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# The GenAI semantic conventions' model server metrics, with the bucket boundaries they give
GENAI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
GENAI_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
GENAI_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")  # gen_ai.operation.name…
PROVIDER = "loupe"  # gen_ai.provider.name, as on the root spans
# Over OTLP the GenAI metrics take their OpenTelemetry names and attribute keys back (Prometheus
# spells the dots as underscores and adds the unit to the name); loupe_* keep theirs.
OTEL_NAMES = {f"{name.replace('.', '_')}_seconds": name for name in (
    "gen_ai.server.request.duration", "gen_ai.server.time_to_first_token", "gen_ai.server.time_per_output_token")}
OTEL_ATTRIBUTES = {key.replace(".", "_"): key for key in (
    "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "error.type")}
UNITS = {"seconds": "s", "bytes": "By", "tokens": "{token}"}  # UCUM, from a family's unit or its name's last word


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loupe_requests", "Requests by how they ended (finish reason or HTTP error)", ["status"], registry=r)
        self.outcomes = Counter("loupe_request_outcomes", "Requests by outcome: completed; cancelled (the client went "
                                "away, or aborted); rejected (a 4xx before running); overloaded (503 or 429: no "
                                "room, or draining); failed", ["outcome"], registry=r)
        self.prompt_tokens = Counter("loupe_prompt_tokens", "Prompt tokens of requests that produced output", registry=r)
        self.generation_tokens = Counter("loupe_generation_tokens", "Generated tokens", registry=r)
        self.time_to_first_token = Histogram("loupe_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram("loupe_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loupe_queue_time_seconds", "Time waiting for admission", buckets=LATENCY_BUCKETS, registry=r)
        # The stages of the trace's spans, from the same timings (one observation per finished request):
        self.prefill_time = Histogram("loupe_prefill_time_seconds", "Admission to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("loupe_decode_time_seconds", "First token to the end", buckets=LATENCY_BUCKETS, registry=r)
        self.detokenize_time = Histogram("loupe_detokenize_time_seconds", "Detokenizer busy time for the request", buckets=SHORT_BUCKETS, registry=r)
        self.num_running = Gauge("loupe_num_running_reqs", "Requests admitted to the running batch", registry=r)
        self.num_waiting = Gauge("loupe_num_waiting_reqs", "Requests waiting for admission", registry=r)
        self.kv_used_tokens = Gauge("loupe_kv_used_tokens", "KV cache tokens held by requests (not evictable)", registry=r)
        self.kv_cached_tokens = Gauge("loupe_kv_cached_tokens", "KV cache tokens the prefix cache keeps "
                                      "(evictable; neither free nor held by requests)", registry=r)
        self.kv_usage = Gauge("loupe_kv_cache_usage", "Fraction of the KV cache held by requests", registry=r)
        self.spans_exported = Counter("loupe_tracing_spans_exported", "Spans accepted by the OTLP backend", registry=r)
        self.spans_dropped = Counter("loupe_tracing_spans_dropped", "Spans dropped: the export queue was full", registry=r)
        self.spans_queued = Gauge("loupe_tracing_spans_queued", "Spans in the exporter now: queued for "
                                  "export or held for a tail verdict", registry=r)
        self.spans_failed = Counter("loupe_tracing_spans_failed", "Spans lost to failed exports", registry=r)
        self.traces_kept = Counter("loupe_tracing_traces_kept", "Unsampled traces kept whole by a tail rule", ["reason"], registry=r)
        self.traces_discarded = Counter("loupe_tracing_traces_discarded", "Unsampled traces held and then discarded", ["reason"], registry=r)
        self.kv_transfers = Counter("loupe_kv_transfers", "Requests whose KV moved between a prefill and a decode server", registry=r)
        self.kv_transfer_bytes = Counter("loupe_kv_transfer_bytes", "Bytes of KV sent (prefill server) or received (decode server)", registry=r)
        self.kv_transfer_seconds = Histogram("loupe_kv_transfer_seconds", "Time to send or receive one request's KV", buckets=SHORT_BUCKETS, registry=r)
        self.kv_transfer_failures = Counter("loupe_kv_transfer_failures", "Requests whose KV exchange failed (no claim, no KV, mismatch)", registry=r)
        self.disaggregation_rejected = Counter(
            "loupe_disaggregation_rejected", "What another server sent that was refused and dropped: connections "
            "without a valid handshake (no or another secret), malformed, oversized or unknown-version frames",
            ["reason"], registry=r)
        self.exporter_restarts = Counter("loupe_tracing_exporter_restarts", "Times the span exporter process died "
                                         "and was started again", registry=r)
        self.metrics_snapshots = Counter("loupe_metrics_snapshots", "Snapshots of these metrics pushed over OTLP, by "
                                         "what became of them: exported; failed (the backend refused them, was down "
                                         "or did not answer in time); dropped (the metrics exporter was busy with "
                                         "an earlier one)", ["result"], registry=r)
        self._exporter_totals = ExporterStats(0, 0, 0)
        self._replicas: dict[int, SchedulerStats] = {}
        self.open_requests = Gauge("loupe_open_requests", "Requests the HTTP side holds state for", registry=r)
        self.genai_duration = Histogram(
            "gen_ai_server_request_duration", "Generative AI server request duration such as time-to-last byte or "
            "last output token", [*GENAI_LABELS, "error_type"], unit="seconds", buckets=GENAI_DURATION_BUCKETS,
            registry=r)
        self.genai_ttft = Histogram("gen_ai_server_time_to_first_token", "Time to generate first token for successful "
                                    "responses", GENAI_LABELS, unit="seconds", buckets=GENAI_TTFT_BUCKETS, registry=r)
        self.genai_tpot = Histogram("gen_ai_server_time_per_output_token", "Time per output token generated after the "
                                    "first token for successful responses", GENAI_LABELS, unit="seconds",
                                    buckets=GENAI_TPOT_BUCKETS, registry=r)

    def observe_genai(self, operation: str, model: str, e2e: float, ttft: float | None, completion_tokens: int,
                      error_type: str | None, exemplar: dict | None) -> None:
        """One request of a generation route (gen_ai.operation.name `operation`, the `model` it
        asked for: "" when it names none) as the GenAI server metrics count it: its duration,
        with `error_type` when it failed; its TTFT and time per output token after the first
        when it succeeded."""
        labels = (operation, PROVIDER, model)
        self.genai_duration.labels(*labels, error_type or "").observe(e2e, exemplar)
        if error_type is None and ttft is not None:
            self.genai_ttft.labels(*labels).observe(ttft, exemplar)
            if completion_tokens > 1:
                self.genai_tpot.labels(*labels).observe((e2e - ttft) / (completion_tokens - 1), exemplar)

    def set_scheduler_stats(self, stats: SchedulerStats) -> None:
        """The latest stats of one scheduler; the gauges show the sum over data-parallel replicas."""
        before = self._replicas.get(stats.dp_rank)
        for reason, total in stats.kv_rejected.items():
            self.disaggregation_rejected.labels(reason=reason).inc(
                max(total - (before.kv_rejected.get(reason, 0) if before else 0), 0))
        self._replicas[stats.dp_rank] = stats
        replicas = self._replicas.values()
        self.num_running.set(sum(s.num_running for s in replicas))
        self.num_waiting.set(sum(s.num_waiting for s in replicas))
        used, total = sum(s.kv_used_tokens for s in replicas), sum(s.kv_total_tokens for s in replicas)
        self.kv_used_tokens.set(used)
        self.kv_cached_tokens.set(sum(s.kv_cached_tokens for s in replicas))
        self.kv_usage.set(used / max(total, 1))

    def set_exporter_stats(self, stats: ExporterStats) -> None:
        """The exporter reports running totals; the counters advance by the difference (from
        zero for a restarted exporter, which counts afresh)."""
        last = self._exporter_totals if self._exporter_totals.pid == stats.pid else ExporterStats(0, 0, 0)
        self.spans_exported.inc(max(stats.exported - last.exported, 0))
        self.spans_dropped.inc(max(stats.dropped - last.dropped, 0))
        self.spans_failed.inc(max(stats.failed - last.failed, 0))
        for counter, now, before in ((self.traces_kept, stats.kept, last.kept),
                                     (self.traces_discarded, stats.discarded, last.discarded)):
            for reason, total in now.items():
                counter.labels(reason=reason).inc(max(total - before.get(reason, 0), 0))
        self.spans_queued.set(stats.queued)
        self._exporter_totals = stats

    def exporter_died(self, restarted: bool) -> None:
        """The spans the dead exporter held, as it last reported them, are lost: count them."""
        self.spans_dropped.inc(self._exporter_totals.queued)
        self.spans_queued.set(0)
        # Its pid stays: a report of its own still on the way changes no total again.
        self._exporter_totals = dataclasses.replace(self._exporter_totals, queued=0)
        if restarted:
            self.exporter_restarts.inc()

    def metrics_exported(self, report: ipc.MetricsExported) -> None:
        self.metrics_snapshots.labels(result="exported" if report.ok else "failed").inc()
        self.metrics_snapshots.labels(result="dropped").inc(report.superseded)

    def snapshot(self, number: int) -> ipc.MetricsSnapshot:
        """Every family as collected now, in plain values, under its OTLP name and unit, with
        attribute keys for labels; an empty label is no attribute, as in Prometheus."""
        families = []
        for family in self.registry.collect():
            cut = len(family.name)
            samples = [(s.name[cut:], {OTEL_ATTRIBUTES.get(k, k): v for k, v in s.labels.items() if v}, s.value,
                        s.exemplar and tuple(s.exemplar)) for s in family.samples]
            families.append(ipc.MetricFamily(OTEL_NAMES.get(family.name, family.name), family.type,
                                             UNITS.get(family.unit or family.name.rpartition("_")[2], ""),
                                             family.documentation, samples))
        return ipc.MetricsSnapshot(time.time_ns(), number, families)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics and their content type: OpenMetrics, which alone shows the latency
        histograms' trace-id exemplars, when the scraper's Accept header asks for it."""
        if "application/openmetrics-text" in accept:
            return openmetrics.generate_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(self.registry), PROMETHEUS_TEXT


class MetricsPusher:
    """A snapshot of `metrics` to the metrics exporter every `interval` seconds, from a thread
    of its own (collecting takes ~1 ms). Never waits: while the exporter is busy (a slow
    backend) or gone, snapshots are dropped and counted; a later one carries the same totals."""

    def __init__(self, metrics: Metrics, address: str, interval: float):
        self.metrics, self.interval = metrics, interval
        self.sock = ipc.connect(zmq.Context.instance(), zmq.PUSH, address, queue=ipc.METRICS_QUEUE)
        self.taken = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="metrics-push", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.push()

    def push(self) -> None:
        snapshot = self.metrics.snapshot(self.taken)
        self.taken += 1
        try:
            self.sock.send(ipc.encode(snapshot), zmq.NOBLOCK)
        except zmq.Again:
            self.metrics.metrics_snapshots.labels(result="dropped").inc()

    def close(self) -> None:
        """Push a last snapshot: the exporter, stopped next, sends what changed since the previous one."""
        self.stopped.set()
        self.thread.join()
        self.push()
