"""Server arguments: flag types from the annotations, one-line refusals naming the flag."""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from loupe.config import SchedulerSettings, ServerArgs, WorkerSettings, flag_type


def test_flag_types_come_from_the_annotations():
    assert flag_type(int) == (int, None) and flag_type(float) == (float, None)
    assert flag_type(str | None) == (str, None) and flag_type(float | None) == (float, None)
    assert flag_type(Literal[1, 2, 3]) == (int, (1, 2, 3))
    assert flag_type(Literal["a", "b"]) == (str, ("a", "b"))


def test_cli_parses_each_flag_into_its_type():
    args = ServerArgs.from_cli(["--trace-level", "2", "--dtype", "float32", "--max-total-tokens", "64",
                                "--enable-trace", "--otlp-traces-endpoint", "h:1"])
    assert args.trace_level == 2 and args.dtype == "float32" and args.max_total_tokens == 64
    assert args.enable_tracing is True and args.otlp_endpoint == "h:1" and args.context_length is None
    keep = ServerArgs.from_cli(["--trace-keep-errors", "--trace-keep-slower-than-ms", "250", "--log-requests"])
    assert keep.trace_keep_errors is True and keep.trace_keep_slower_than_ms == 250.0 and keep.log_requests is True
    modules = ServerArgs.from_cli(["--enable-tracing", "--trace-module", "request, scheduler"])  # SGLang's name too
    assert [modules.traces(m) for m in ("request", "scheduler", "detokenizer")] == [True, True, False]
    assert not ServerArgs.from_cli(["--trace-modules", "request"]).traces("request")  # tracing off


@pytest.mark.parametrize("argv,flag", [(["--trace-level", "4"], "--trace-level"), (["--dtype", "float8"], "--dtype"),
                                       (["--port", "x"], "--port"), (["--page-size", "0"], "--page-size"),
                                       (["--trace-sampling-ratio", "1.5"], "--trace-sampling-ratio"),
                                       (["--trace-keep-slower-than-ms", "-5"], "--trace-keep-slower-than-ms"),
                                       (["--trace-modules", "request,kv"], "--trace-modules")])
def test_bad_values_are_refused_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        ServerArgs.from_cli(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_a_float_flag_parses_as_a_float():
    @dataclass(frozen=True)
    class WithRatio(ServerArgs):
        ratio: float = field(default=1.0, metadata={"help": "a ratio", "aliases": ()})

    parser = __import__("argparse").ArgumentParser()
    WithRatio.add_cli_args(parser)
    assert parser.parse_args(["--ratio", "0.25"]).ratio == 0.25


def test_each_component_gets_only_its_settings():
    args = ServerArgs(max_running_requests=8, chunked_prefill_size=64, page_size=4, tp_size=2)
    assert args.settings(SchedulerSettings) == SchedulerSettings(8, 64, False, 0)
    worker = args.settings(WorkerSettings)
    assert (worker.page_size, worker.max_running_requests, worker.ranks_per_node) == (4, 8, 2)


def test_server_args_cannot_change_once_validated():
    args = ServerArgs(max_running_requests=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.max_running_requests = 0  # would skip validation
