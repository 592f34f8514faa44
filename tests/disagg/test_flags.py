"""A disaggregated server's flags: refused at start-up with one line naming what is wrong."""

import importlib.util

import pytest

from loupe.config import ServerArgs
from loupe.launch_server import check_transfer_backend


@pytest.mark.parametrize("argv,flag", [
    (["--disaggregation-mode", "prefill", "--tp-size", "2"], "--disaggregation-mode"),
    (["--disaggregation-mode", "decode", "--dp-size", "2"], "--disaggregation-mode"),
    (["--disaggregation-mode", "both"], "--disaggregation-mode"),
    (["--disaggregation-bootstrap-port", "0"], "--disaggregation-bootstrap-port"),
    (["--disaggregation-transfer-backend", "mooncake"], "--disaggregation-transfer-backend"),
    (["--disaggregation-timeout", "0"], "--disaggregation-timeout"),
])
def test_bad_values_are_refused_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(argv)
    assert flag in capsys.readouterr().err


def test_nixl_missing_is_refused_with_the_line_that_installs_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nixl" else find_spec(name, *a))
    with pytest.raises(SystemExit, match="pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"):
        check_transfer_backend(ServerArgs(disaggregation_mode="decode"))
    check_transfer_backend(ServerArgs(disaggregation_mode="decode", disaggregation_transfer_backend="tcp"))
    check_transfer_backend(ServerArgs())  # not disaggregated: NIXL is not needed
