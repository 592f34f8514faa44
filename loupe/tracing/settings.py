"""Where and how spans are exported: the endpoint flag and the environment (SPEC §1)."""

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
        values = {}
        for key, names, default, least in (
            ("schedule_delay_ms", ("LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS",
                                   "SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS", "OTEL_BSP_SCHEDULE_DELAY"), "500", 0),
            ("max_export_batch_size", ("LOUPE_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE",
                                       "SGLANG_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), "64", 1),
            ("max_queue_size", ("OTEL_BSP_MAX_QUEUE_SIZE",), "2048", 1),
            ("file_max_bytes", ("LOUPE_OTLP_FILE_MAX_MB",), "100", 0),
            ("file_backups", ("LOUPE_OTLP_FILE_BACKUPS",), "10", 0),
        ):
            name = next((n for n in names if os.environ.get(n)), names[0])
            values[key] = parsed(first_env(*names, default=default), int, lambda v, least=least: v >= least, name,
                                 "a positive integer")
        values["file_max_bytes"] *= 2**20
        if protocol == "file":
            from loupe.tracing.file_export import check_writable, file_path

            check_writable(file_path(endpoint.strip()))
            return cls(endpoint.strip(), protocol, **values)
        return cls(normalize_endpoint(endpoint, protocol), protocol, **values)


def normalize_endpoint(endpoint: str, protocol: str) -> str:
    """`host:4317` and `http://host:4317` for gRPC; `http://host:4318` gets `/v1/traces` for HTTP."""
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parsed = urlparse(endpoint)
    if not parsed.hostname:
        raise ValueError(f"--otlp-endpoint must look like http://host:port, got {endpoint!r}")
    if protocol == "http/protobuf" and parsed.path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def missing_packages() -> list[str]:
    """pip names of the OpenTelemetry packages tracing needs that are not installed."""
    import importlib.util

    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    return [package for module, package in REQUIRED_PACKAGES.items() if not found(module)]
