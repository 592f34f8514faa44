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
    (["--disaggregation-secret", "short"], "--disaggregation-secret"),
    # A bootstrap port beyond loopback needs a secret: anyone reaching it could ask for KV.
    (["--disaggregation-mode", "prefill", "--host", "0.0.0.0"], "--disaggregation-secret"),
    (["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-host", "10.0.0.5"], "--disaggregation-secret"),
    (["--disaggregation-prefill-hosts", "a,,b"], "--disaggregation-prefill-hosts"),
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


def test_the_bootstrap_port_may_listen_apart_from_http_and_the_secret_comes_from_the_environment(monkeypatch):
    secret = "s3cret-of-sixteen-or-more"
    args = ServerArgs.from_cli(["--disaggregation-mode", "prefill", "--host", "0.0.0.0",
                                "--disaggregation-bootstrap-host", "127.0.0.1"])
    assert args.bootstrap_host == "127.0.0.1" and args.disaggregation_secret is None  # loopback: no secret needed
    monkeypatch.setenv("LOUPE_DISAGGREGATION_SECRET", secret)
    args = ServerArgs.from_cli(["--disaggregation-mode", "prefill", "--host", "0.0.0.0"])
    assert args.bootstrap_host == "0.0.0.0" and args.disaggregation_secret == secret
    assert ServerArgs.from_cli(["--disaggregation-secret", "x" * 16]).disaggregation_secret == "x" * 16  # flag wins
    args = ServerArgs.from_cli(["--disaggregation-prefill-hosts", "P1.internal, 10.0.0.7:8998"])
    assert args.allowed_prefill_hosts == ["p1.internal", "10.0.0.7:8998"]
