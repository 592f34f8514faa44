"""What OTEL_METRICS_EXPORTER=otlp costs per export, on each side of the socket:

    .venv/bin/python benchmarks/bench_metrics_export.py --rounds 200

The HTTP process's part (a snapshot of the registry in plain values, pickled) and the metrics
exporter's (unpickled, encoded to an ExportMetricsServiceRequest, serialised), in CPU time,
on a registry that has seen `--requests` requests over three operations, with exemplars,
cumulative and delta. Sending is left out: it is the exporter's waiting, not CPU.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

from loupe import ipc
from loupe.server.metrics import Metrics
from loupe.tracing.metrics_otlp import MetricsEncoder


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def busy_registry(requests: int) -> Metrics:
    metrics, rng = Metrics(), random.Random(0)
    for i in range(requests):
        operation = rng.choice(["chat", "text_completion", "generate"])
        exemplar = {"trace_id": f"{rng.getrandbits(128):032x}"}
        metrics.observe_genai(operation, "" if operation == "generate" else "model", rng.uniform(0.05, 5),
                              rng.uniform(0.01, 0.5), 64, "kv_transfer_failed" if i % 50 == 0 else None, exemplar)
        metrics.requests.labels(status=rng.choice(["stop", "length", "abort"])).inc()
        metrics.outcomes.labels(outcome="completed").inc()
        metrics.e2e_latency.observe(rng.uniform(0.05, 5), exemplar)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    metrics = busy_registry(args.requests)
    print(f"CPU: {cpu_model()}")
    for delta in (False, True):
        encoder = MetricsEncoder({"service.name": "loupe"}, delta)
        start = time.process_time()
        for n in range(args.rounds):
            frame = ipc.encode(metrics.snapshot(n))
        http_side = (time.process_time() - start) / args.rounds
        start = time.process_time()
        for _ in range(args.rounds):
            payload = encoder.encode(ipc.decode(frame)).SerializeToString()
            encoder.commit()
        exporter_side = (time.process_time() - start) / args.rounds
        samples = sum(len(family.samples) for family in ipc.decode(frame).families)
        print(f"{'delta' if delta else 'cumulative'}: {samples} samples; HTTP process {http_side * 1e3:.2f} ms "
              f"CPU per snapshot ({len(frame)} B pickled); exporter {exporter_side * 1e3:.2f} ms ({len(payload)} B)")


if __name__ == "__main__":
    main()
