import pytest

from loupe.tracing.settings import ExportSettings, normalize_endpoint


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_BSP_SCHEDULE_DELAY",
                 "LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS", "SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS",
                 "LOUPE_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE", "SGLANG_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE",
                 "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_MAX_QUEUE_SIZE"]:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    s = ExportSettings.from_env("http://localhost:4317")
    assert (s.protocol, s.schedule_delay_ms, s.max_export_batch_size, s.max_queue_size) == ("grpc", 500, 64, 2048)
    assert s.endpoint == "http://localhost:4317"


def test_first_variable_set_wins(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "300")
    assert ExportSettings.from_env("h:1").schedule_delay_ms == 300
    monkeypatch.setenv("SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS", "200")
    assert ExportSettings.from_env("h:1").schedule_delay_ms == 200
    monkeypatch.setenv("LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS", "100")
    assert ExportSettings.from_env("h:1").schedule_delay_ms == 100
    monkeypatch.setenv("SGLANG_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE", "7")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "9")
    assert ExportSettings.from_env("h:1").max_export_batch_size == 7
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "5")
    assert ExportSettings.from_env("h:1").max_queue_size == 5


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("SGLANG_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE", "lots")
    with pytest.raises(ValueError, match="SGLANG_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE"):
        ExportSettings.from_env("h:1")
    monkeypatch.delenv("SGLANG_OTLP_EXPORTER_MAX_EXPORT_BATCH_SIZE")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        ExportSettings.from_env("h:1")


@pytest.mark.parametrize("given,protocol,expected", [
    ("http://host:4317", "grpc", "http://host:4317"),
    ("host:4317", "grpc", "http://host:4317"),
    ("http://host:4318/v1/traces", "http/protobuf", "http://host:4318/v1/traces"),
    ("http://host:4318", "http/protobuf", "http://host:4318/v1/traces"),
    ("http://host:4318/", "http/protobuf", "http://host:4318/v1/traces"),
    ("host:4318", "http/protobuf", "http://host:4318/v1/traces"),
    ("http://host:4318/custom/path", "http/protobuf", "http://host:4318/custom/path"),
])
def test_endpoint_forms(given, protocol, expected):
    assert normalize_endpoint(given, protocol) == expected
