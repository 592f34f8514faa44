"""Where and how spans and metrics are exported: the endpoint flag and the environment (SPEC §1, §5.9)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

REQUIRED_PACKAGES = {
    "opentelemetry.sdk": "opentelemetry-sdk",
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2": "opentelemetry-proto",
    "h2": "h2",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter": "opentelemetry-exporter-otlp-proto-http",
}


def first_env(*names: str, default: str) -> str:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return value
    return default


def parsed(raw: str, kind: type, holds, name: str, said: str):
    """An environment variable's value as `kind` (int or float); ValueError saying that `name`
    must be `said` when it is not one, or `holds(value)` is false."""
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not holds(value):
        raise ValueError(f"{name} must be {said}, got {raw!r}")
    return value


def env_int(names: tuple[str, ...], default: str, least: int) -> int:
    """The first of the variables `names` that is set, as an int of at least `least`."""
    name = next((n for n in names if os.environ.get(n)), names[0])
    return parsed(first_env(*names, default=default), int, lambda v: v >= least, name, f"an integer >= {least}")


def file_rotation() -> dict[str, int]:
    """When a file:// endpoint's file is rotated, and how many rotated files are kept."""
    return {"file_max_bytes": env_int(("LOUPE_OTLP_FILE_MAX_MB",), "100", 0) * 2**20,
            "file_backups": env_int(("LOUPE_OTLP_FILE_BACKUPS",), "10", 0)}


@dataclass(frozen=True)
class ExportSettings:
    endpoint: str
    protocol: str  # "grpc" | "http/protobuf" | "file" (chosen by a file:// endpoint)
    schedule_delay_ms: int
    max_export_batch_size: int
    max_queue_size: int
    file_max_bytes: int = 100 * 2**20  # a file:// endpoint's file is rotated past this size (0: never)
    file_backups: int = 10  # rotated files kept

    @classmethod
    def from_env(cls, endpoint: str) -> ExportSettings:
        """Raises ValueError naming the variable of a bad value."""
        protocol = first_env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL", default="grpc")
        if endpoint.strip().startswith("file://"):  # the scheme decides, whatever the protocol variable says
            protocol = "file"
        elif protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be grpc or http/protobuf, got {protocol!r}")
        values = {key: env_int(names, default, least) for key, names, default, least in (
            ("schedule_delay_ms", ("LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS",
                                   "SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS", "OTEL_BSP_SCHEDULE_DELAY"), "500", 0),
            ("max_export_batch_size", ("LOUPE_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE",
                                       "SGLANG_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), "64", 1),
            ("max_queue_size", ("OTEL_BSP_MAX_QUEUE_SIZE",), "2048", 1),
        )}
        values.update(file_rotation())
        if protocol == "file":
            from loupe.tracing.file_export import check_writable, file_path

            check_writable(file_path(endpoint.strip()))
            return cls(endpoint.strip(), protocol, **values)
        return cls(normalize_endpoint(endpoint, protocol), protocol, **values)


def normalize_endpoint(endpoint: str, protocol: str, path: str = "/v1/traces", name: str = "--otlp-endpoint") -> str:
    """`host:4317` and `http://host:4317` for gRPC; `http://host:4318` gets `path` for HTTP.
    A bad one is a ValueError naming where it came from (`name`)."""
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parsed = urlparse(endpoint)
    if not parsed.hostname:
        raise ValueError(f"{name} must look like http://host:port, got {endpoint!r}")
    if protocol == "http/protobuf" and parsed.path in ("", "/"):
        endpoint = endpoint.rstrip("/") + path
    return endpoint


@dataclass(frozen=True)
class MetricsSettings:
    """Pushing /metrics over OTLP (OTEL_METRICS_EXPORTER=otlp), as the SDK's variables say."""

    endpoint: str
    protocol: str  # "grpc" | "http/protobuf" | "file" (chosen by a file:// endpoint)
    interval_ms: int  # a snapshot of the metrics this often
    delta: bool  # counters and histograms as what changed since the previous export, not totals
    file_max_bytes: int = 100 * 2**20
    file_backups: int = 10

    @classmethod
    def from_env(cls, spans: ExportSettings | None = None) -> MetricsSettings | None:
        """None unless OTEL_METRICS_EXPORTER is `otlp`; raises ValueError naming the variable
        of a bad value. `spans`: where spans go, when tracing is on; unless the variables say
        otherwise, metrics go there too (not into the spans' file)."""
        chosen = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
        if chosen in ("", "none"):
            return None
        if chosen != "otlp":
            raise ValueError(f"OTEL_METRICS_EXPORTER must be otlp or none (/metrics is served either way), "
                             f"got {chosen!r}")
        spans = spans if spans is not None and spans.protocol != "file" else None
        protocol = first_env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL",
                             default=spans.protocol if spans else "grpc")
        endpoint = metrics_endpoint(protocol, spans.endpoint if spans else "")
        name = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
        if endpoint.startswith("file://"):
            from loupe.tracing.file_export import check_writable, file_path

            protocol = "file"
            check_writable(file_path(endpoint), name)
        elif protocol in ("grpc", "http/protobuf"):
            endpoint = normalize_endpoint(endpoint, protocol, "/v1/metrics", name)
        else:
            raise ValueError(f"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL must be grpc or http/protobuf, got {protocol!r}")
        temporality = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "").strip().lower()
        if temporality not in ("", "cumulative", "delta", "lowmemory"):
            raise ValueError("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE must be cumulative, delta or "
                             f"lowmemory, got {temporality!r}")
        # lowmemory differs from delta only for asynchronous counters, which loupe has none of
        return cls(endpoint, protocol, env_int(("OTEL_METRIC_EXPORT_INTERVAL",), "60000", 1),
                   temporality in ("delta", "lowmemory"), **file_rotation())


def metrics_endpoint(protocol: str, spans_endpoint: str) -> str:
    """OTEL_EXPORTER_OTLP_METRICS_ENDPOINT as it is; else a base endpoint, to which HTTP adds
    /v1/metrics as the SDK does: OTEL_EXPORTER_OTLP_ENDPOINT, else the spans' endpoint, else
    the SDK's default."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip()
    if endpoint:
        return endpoint
    base = first_env("OTEL_EXPORTER_OTLP_ENDPOINT", default=spans_endpoint).strip()
    if protocol != "http/protobuf":
        return base or "http://localhost:4317"
    return (base.removesuffix("/v1/traces") or "http://localhost:4318").rstrip("/") + "/v1/metrics"


def missing_packages() -> list[str]:
    """pip names of the OpenTelemetry packages tracing needs that are not installed."""
    import importlib.util

    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    return [package for module, package in REQUIRED_PACKAGES.items() if not found(module)]
