"""Messages between processes (loupe/ipc.py): dispatch by type, and the private socket folder."""

import os
import shutil
import stat

import pytest

from loupe import ipc
from loupe.core import SamplingParams, TokenizedRequest


def test_dispatch_calls_the_handler_of_the_message_type():
    seen = []
    dispatch = ipc.Dispatch({TokenizedRequest: lambda m: seen.append(("request", m.rid)) or "added",
                             ipc.AbortRequest: lambda m: seen.append(("abort", m.rid))})
    assert dispatch(TokenizedRequest("a", [1], SamplingParams())) == "added"
    dispatch(ipc.AbortRequest("b"))
    assert seen == [("request", "a"), ("abort", "b")]


def test_an_unexpected_message_is_a_type_error():
    with pytest.raises(TypeError, match="no handler for a str message"):
        ipc.Dispatch({int: str})("hello")


def test_messages_round_trip_and_endpoints_live_in_a_private_folder():
    endpoints = ipc.Endpoints.create(dp_size=2)
    try:
        assert stat.S_IMODE(os.stat(endpoints.folder).st_mode) == 0o700
        assert len({endpoints.replica(0), endpoints.replica(1), endpoints.scheduler}) == 3
        request = TokenizedRequest("a", [1, 2], SamplingParams(max_new_tokens=3))
        assert ipc.decode(ipc.encode(request)) == request
    finally:
        shutil.rmtree(endpoints.folder)
