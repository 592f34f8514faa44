"""Which requests are traced: the ratio, the caller's flag, the request's own choice, the level."""

import random

import pytest

from loupe.config import ServerArgs
from loupe.core import TraceDecision
from loupe.tracing.sampling import TraceControl, ratio_keeps

SAMPLED, OFF = TraceDecision.SAMPLED, TraceDecision.OFF


def test_the_ratio_is_a_pure_function_of_the_trace_id():
    ids = [random.Random(seed).getrandbits(128) for seed in range(20_000)]
    kept = [i for i in ids if ratio_keeps(i, 0.25)]
    assert 0.23 < len(kept) / len(ids) < 0.27
    assert kept == [i for i in ids if ratio_keeps(i, 0.25)]  # the same ids, every time, everywhere
    assert not any(ratio_keeps(i, 0.0) for i in ids) and all(ratio_keeps(i, 1.0) for i in ids)
    assert set(kept) <= {i for i in ids if ratio_keeps(i, 0.5)}  # a higher ratio keeps a superset


def test_who_decides_level_then_request_then_caller_then_ratio():
    control = TraceControl(level=3, sampling_ratio=0.0)
    assert control.decide(1, None) == OFF
    assert control.decide(1, 0x01) == SAMPLED and control.decide(1, 0x00) == OFF  # parent-based
    assert control.decide(1, 0x00, wanted=True) == SAMPLED and control.decide(1, 0x01, wanted=False) == OFF
    control.parent_based = False
    assert control.decide(1, 0x01) == OFF  # the ratio alone
    control.level = 0
    assert control.decide(1, 0x01, wanted=True) == OFF  # off is off


@pytest.mark.parametrize("sampler,arg,flag,expected", [
    (None, None, None, (1.0, True)),
    ("always_off", None, None, (0.0, False)),
    ("parentbased_always_off", None, None, (0.0, True)),
    ("traceidratio", "0.1", None, (0.1, False)),
    ("parentbased_traceidratio", "0.1", 0.5, (0.5, True)),  # the flag wins
    ("ALWAYS_ON", None, 0.3, (0.3, False)),
])
def test_the_opentelemetry_sampler_variables(monkeypatch, sampler, arg, flag, expected):
    for name, value in (("OTEL_TRACES_SAMPLER", sampler), ("OTEL_TRACES_SAMPLER_ARG", arg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    control = TraceControl.from_env(3, flag)
    assert (control.sampling_ratio, control.parent_based) == expected


@pytest.mark.parametrize("name,value", [("OTEL_TRACES_SAMPLER", "sometimes"), ("OTEL_TRACES_SAMPLER_ARG", "1.5")])
def test_bad_sampler_variables_are_refused_by_name(monkeypatch, name, value):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        TraceControl.from_env(3, None)


def test_changes_are_checked_before_any_applies():
    control = TraceControl(level=3)
    with pytest.raises(ValueError) as bad:
        control.update({"level": 1, "sampling_ratio": 2})
    assert bad.value.args[0] == "sampling_ratio" and control.level == 3
    for changes, name in (({"level": 4}, "level"), ({"level": True}, "level"), ({"parent_based": "no"}, "parent_based"),
                          ({"verbosity": 1}, "verbosity")):
        with pytest.raises(ValueError) as bad:
            control.update(changes)
        assert bad.value.args[0] == name
    control.update({"level": 0, "sampling_ratio": 1})
    assert control.settings() == {"level": 0, "sampling_ratio": 1.0, "parent_based": True, "keep_errors": False,
                                  "keep_slower_than_ms": None, "keep_cancelled": False}


def test_trace_level_from_the_environment_the_flag_winning(monkeypatch, capsys):
    monkeypatch.setenv("SGLANG_TRACE_LEVEL", "2")
    assert ServerArgs.from_cli([]).trace_level == 2
    monkeypatch.setenv("LOUPE_TRACE_LEVEL", "0")
    assert ServerArgs.from_cli([]).trace_level == 0  # loupe's name first
    assert ServerArgs.from_cli(["--trace-level", "3"]).trace_level == 3
    monkeypatch.setenv("LOUPE_TRACE_LEVEL", "high")
    with pytest.raises(SystemExit):
        ServerArgs.from_cli([])
    assert "LOUPE_TRACE_LEVEL" in capsys.readouterr().err
