"""The pair's wire format: every message round-trips, and anything else is refused by reason
without building an object the sender chose."""

import json
import os
import pickle

import pytest

from loupe.core import Bootstrap, InvalidRequest, KVLayout, TokenLogprob
from loupe.disagg import wire

LAYOUT = KVLayout(30, 3, 64, "float32", 16)
TARGET = wire.NixlTarget("loupe-decode-1-ab", b"\x00metadata\xff", 1 << 40, (1 << 40) + 4096, 8192, (3, 4, 9))


class Marker:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("message,raw", [
    (wire.Claim(2**64 - 1, 33, LAYOUT, "nixl", TARGET), []),
    (wire.Claim(7, 33, LAYOUT, "tcp"), []),
    (wire.KVReady(7, 42, 33, 1024, 0.25, TokenLogprob(42, -0.5, [(42, -0.5), (7, -1.25)])), []),
    (wire.KVReady(7, 42, 33), [b"k" * 12, b"v" * 12]),
    (wire.Refused(7, "layout", layout=LAYOUT), []),
    (wire.Refused(7, "num_tokens", num_tokens=12), []),
    (wire.Received(7, True), []), (wire.Cancel(7), []), (wire.Writing(7), []), (wire.Ping(), []),
])
def test_every_message_round_trips(message, raw):
    decoded, frames = wire.decode(wire.encode(message, *raw))
    assert decoded == message
    assert [bytes(f) for f in frames][-len(raw) or len(frames):] == raw


def header(**fields) -> bytes:
    return json.dumps({"v": wire.VERSION, **fields}).encode()


CLAIM = {"kind": "claim", "room": 1, "num_tokens": 4, "backend": "tcp", "layout": vars(LAYOUT), "target": None}


@pytest.mark.parametrize("frames,reason,says", [
    ([], "malformed", "empty"),
    ([b"\x80\x04garbage"], "malformed", "not JSON"),
    ([b"[1, 2]"], "malformed", "not a JSON object"),
    ([json.dumps({"v": 2, "kind": "claim"}).encode()], "version", "version"),
    ([header(kind="exec")], "version", "unknown message kind"),
    ([b" " * (wire.MAX_HEADER + 1)], "oversized", "header of"),
    ([header(**{**CLAIM, "room": 2**64})], "malformed", "room"),
    ([header(**{**CLAIM, "room": -1})], "malformed", "room"),
    ([header(**{**CLAIM, "room": True})], "malformed", "room"),
    ([header(**{**CLAIM, "num_tokens": "4"})], "malformed", "num_tokens"),
    ([header(**{**CLAIM, "backend": "pickle"})], "malformed", "backend"),
    ([header(**{**CLAIM, "layout": {**vars(LAYOUT), "dtype": "object"}})], "malformed", "dtype"),
    ([header(**CLAIM), b"an extra frame"], "malformed", "frames after"),
    ([header(**{**CLAIM, "backend": "nixl", "target": {"agent": "a", "k_address": 1, "v_address": 2,
                                                        "num_slots": 8, "pages": [9]}}), b"md"], "malformed", "pages"),
    ([header(kind="kv", room=1, first_token=3, num_tokens=4, num_bytes=0, seconds=float("nan"))], "malformed",
     "seconds"),
    ([header(kind="refused", room=1, code="run this")], "malformed", "code"),
])
def test_anything_else_is_refused_by_reason(frames, reason, says):
    with pytest.raises(wire.BadMessage, match=says) as refused:
        wire.decode(frames)
    assert refused.value.reason == reason


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = str(tmp_path / "ran")
    for frames in ([pickle.dumps(Marker(marker))], [header(**CLAIM), pickle.dumps(Marker(marker))],
                   [header(kind="kv", room=1, first_token=3, num_tokens=4, num_bytes=0, seconds=0.0,
                           first_logprob=pickle.dumps(Marker(marker)).hex())]):
        with pytest.raises(wire.BadMessage):
            wire.decode(frames)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("bootstrap,param", [
    (Bootstrap("127.0.0.1", 0, 1), "bootstrap_port"), (Bootstrap("127.0.0.1", -1, 1), "bootstrap_port"),
    (Bootstrap("127.0.0.1", 65536, 1), "bootstrap_port"), (Bootstrap("", 8998, 1), "bootstrap_host"),
    (Bootstrap("0.0.0.0", 8998, 1), "bootstrap_host"), (Bootstrap("*", 8998, 1), "bootstrap_host"),
    (Bootstrap("::", 8998, 1), "bootstrap_host"), (Bootstrap("tcp://x", 8998, 1), "bootstrap_host"),
    (Bootstrap("-x", 8998, 1), "bootstrap_host"), (Bootstrap("_", 8998, 1), "bootstrap_host"),
    (Bootstrap("a..b", 8998, 1), "bootstrap_host"), (Bootstrap("[zz]", 8998, 1), "bootstrap_host"),
    (Bootstrap("x" * 254, 8998, 1), "bootstrap_host"),
    (Bootstrap("127.0.0.1", 8998, 2**64), "bootstrap_room"), (Bootstrap("127.0.0.1", 8998, 2**70), "bootstrap_room"),
    (Bootstrap("127.0.0.1", 8998, -1), "bootstrap_room"),
    (Bootstrap("10.0.0.5", 8998, 1), "bootstrap_host"),  # beyond loopback, and no secret
])
def test_bootstrap_fields_a_decode_server_must_not_connect_to(bootstrap, param):
    with pytest.raises(InvalidRequest) as refused:
        bootstrap.check()
    assert refused.value.param == param


def test_the_allow_list_and_the_secret_decide_where_a_decode_server_connects():
    Bootstrap("localhost", 8998, 2**64 - 1).check()
    Bootstrap("::1", 8998, 1).check()
    Bootstrap("[::1]", 8998, 1).check()
    Bootstrap("prefill-0.pd.svc.cluster.local", 8998, 1).check(secret=True)
    Bootstrap("10.0.0.5", 8998, 1).check(secret=True)
    allowed = ["p1.internal", "10.0.0.7:8998"]
    Bootstrap("P1.internal", 1234, 1).check(allowed, secret=True)
    Bootstrap("10.0.0.7", 8998, 1).check(allowed, secret=True)
    for host, port in (("10.0.0.7", 8999), ("p2.internal", 8998)):
        with pytest.raises(InvalidRequest, match="--disaggregation-prefill-hosts"):
            Bootstrap(host, port, 1).check(allowed, secret=True)
    Bootstrap("0.0.0.0", 0, 5).check(connects=False)  # a prefill server checks only the room
