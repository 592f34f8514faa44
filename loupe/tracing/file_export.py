"""OTLP JSON lines to a file: the OpenTelemetry file-exporter format, for `loupe traces`.

Each export is one `ExportTraceServiceRequest` or `ExportMetricsServiceRequest` (the very
message the gRPC and HTTP senders send) on one line, in OTLP/JSON: lowerCamelCase field
names, enums as integers, 64-bit integers as decimal strings, and trace and span ids as hex
strings (protobuf's own JSON mapping writes bytes as base64; OTLP/JSON does not). The OpenTelemetry Collector's
`otlpjsonfile` receiver reads these files, and so does `loupe traces`.

A line is written with one `write()` and flushed to the OS at once, so a killed exporter
loses no exported line. When the file passes `max_bytes` it is renamed to
`{stem}.{n}{suffix}` (`traces.1.jsonl`, `traces.2.jsonl`… in the order written) and a new
one begun; beyond `backups` rotated files, the oldest is deleted.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from opentelemetry.sdk.trace.export import SpanExportResult

logger = logging.getLogger(__name__)
ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def otlp_json(request) -> str:
    """An ExportTraceServiceRequest or ExportMetricsServiceRequest as one line of OTLP/JSON."""
    message = MessageToDict(request, use_integers_for_enums=True)
    for item in with_ids(message):
        for key in item.keys() & ID_FIELDS:
            item[key] = base64.b64decode(item[key]).hex()
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def with_ids(message: dict) -> Iterator[dict]:
    """The parts of an OTLP/JSON request that may hold ids: spans and their links, or the
    exemplars of metrics' data points."""
    for resource_spans in message.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                yield span
                yield from span.get("links", ())
    for resource_metrics in message.get("resourceMetrics", ()):
        for scope_metrics in resource_metrics.get("scopeMetrics", ()):
            for metric in scope_metrics.get("metrics", ()):
                for data in (metric.get("sum"), metric.get("gauge"), metric.get("histogram")):
                    for point in (data or {}).get("dataPoints", ()):
                        yield from point.get("exemplars", ())


def file_path(endpoint: str) -> str:
    """The path of a `file://` endpoint: `file:///abs/traces.jsonl` or `file://./rel.jsonl`."""
    return endpoint[len("file://"):]


def check_writable(path: str, name: str = "--otlp-endpoint") -> None:
    """Raise ValueError naming the setting `name` when OTLP could not be written to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path or path.endswith("/"):
        raise ValueError(f"{name} file:// must name a file, got {'file://' + path!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"{name} names a file in {folder}, which is not a folder that exists")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{name} names {path}, which this user cannot write")


class FileExporter:
    """Appends each export as an OTLP/JSON line to `path`, rotating by size."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self.file = open(self.path, "ab")

    def export(self, request) -> SpanExportResult:
        line = (otlp_json(request) + "\n").encode()
        try:
            if self.max_bytes and self.file.tell() and self.file.tell() + len(line) > self.max_bytes:
                self.rotate()
            self.file.write(line)
            self.file.flush()
        except OSError as e:
            logger.warning("writing to %s failed: %s", self.path, e)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def rotated(self) -> list[tuple[int, Path]]:
        """The rotated files beside the live one, oldest first."""
        pattern = re.compile(re.escape(self.path.stem) + r"\.(\d+)" + re.escape(self.path.suffix) + "$")
        found = ((pattern.match(p.name), p) for p in self.path.parent.iterdir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def rotate(self) -> None:
        self.file.close()
        rotated = self.rotated()
        number = rotated[-1][0] + 1 if rotated else 1
        os.replace(self.path, self.path.with_name(f"{self.path.stem}.{number}{self.path.suffix}"))
        for _, old in rotated[:max(0, len(rotated) + 1 - self.backups)]:
            old.unlink(missing_ok=True)
        self.file = open(self.path, "ab")

    def shutdown(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
