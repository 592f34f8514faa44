"""Assertions that several test modules share (the live servers themselves are in harness/)."""

from __future__ import annotations

import os
import re
import signal

import httpx

from harness import LiveServer


def assert_openai_error(response: httpx.Response, status: int, param: str | None = ...) -> dict:
    """The response has `status` and OpenAI's error body (with `param`, if given); the error."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not ...:
        assert error["param"] == param, error
    return error


def kill_child_and_expect_shutdown(server: LiveServer, process_name: str) -> None:
    """SIGKILL the server's child `process_name` (as its log lines name it): the server must
    exit non-zero with a message naming it, leaving no process behind."""
    found = re.search(rf"\[{re.escape(process_name)} pid:(\d+)\]", server.log())
    assert found, server.log()
    os.kill(int(found.group(1)), signal.SIGKILL)
    assert server.wait_exit(30) not in (None, 0)
    assert f"the {process_name} process (pid {found.group(1)}) died" in server.log()
    assert server.wait_all_gone(15) == []
