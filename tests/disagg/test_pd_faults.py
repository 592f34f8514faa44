"""A prefill/decode pair whose peers are hostile or die, live: the bundled model, each
transfer backend, two prefill and two decode servers sharing a secret (from the environment).
Requests go to both halves at once with bootstrap fields, as SGLang's router sends them.

Each side must outlive the other: a server whose peer is SIGKILLed with requests in flight
fails those requests within seconds (a stream with an error event and [DONE]), counts no
transfer to a dead peer as done, gets its KV pages back and serves the next pair."""

import json
import os
import pickle
import random
import re
import signal
import socket
import threading
import time

import httpx
import pytest
import zmq
from assertions import assert_openai_error

from harness import LiveServer, free_port, read_metrics, running, wait_metrics
from loupe.disagg import channel

pytestmark = pytest.mark.slow  # it starts servers

SECRET = "pd-faults-secret-0123456789"
FAILURE_BOUND_S = 5  # from a peer's death to its requests' errors
rng = random.Random(24)
LONG_PROMPT = [rng.randrange(1000, 40000) for _ in range(900)]


class Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module", params=["tcp", "nixl"])
def servers(request, server_logs):
    """{"P1", "P2", "D1", "D2"}: LiveServers, each prefill server with `.bootstrap_port`."""
    backend, env = request.param, {"LOUPE_DISAGGREGATION_SECRET": SECRET}
    common = ("--disaggregation-transfer-backend", backend, "--max-total-tokens", 8192, "--disaggregation-timeout", 60)
    found = {}
    for name in ("P1", "P2"):
        port = free_port()
        found[name] = LiveServer("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", port, *common,
                                 log_dir=server_logs, env=env)
        found[name].bootstrap_port = port
    for name in ("D1", "D2"):
        found[name] = LiveServer("--disaggregation-mode", "decode", *common, log_dir=server_logs, env=env)
    with running(*found.values()):
        yield found


def body(prefill: LiveServer, room: int, input_ids: list[int] | None = None, **extra) -> dict:
    return {"input_ids": input_ids or LONG_PROMPT, "sampling_params": {"max_new_tokens": 24, "temperature": 0,
                                                                       "ignore_eos": True},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.bootstrap_port, "bootstrap_room": room, **extra}


class Call(threading.Thread):
    """One request on a thread: the status, the stream's events (or the JSON answer) and when
    it ended."""

    def __init__(self, server: LiveServer, payload: dict, stream: bool):
        super().__init__(daemon=True)
        self.server, self.payload, self.stream = server, {**payload, "stream": stream}, stream
        self.status, self.events, self.ended, self.done = None, [], None, False
        self.start()

    def run(self):
        try:
            self._call()
        except httpx.TransportError:  # its server was killed
            self.status = "cut"
        self.ended = time.monotonic()

    def _call(self):
        with httpx.Client(timeout=120, trust_env=False) as http:
            if not self.stream:
                r = http.post(self.server.url("/generate"), json=self.payload)
                self.status, self.events = r.status_code, [r.json()]
            else:
                with http.stream("POST", self.server.url("/generate"), json=self.payload) as r:
                    self.status = r.status_code
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            self.done = True
                        elif line.startswith("data: "):
                            self.events.append(json.loads(line[6:]))


def pair_request(prefill: LiveServer, decode: LiveServer, room: int, input_ids=None) -> tuple[Call, Call]:
    payload = body(prefill, room, input_ids)
    return Call(prefill, payload, stream=False), Call(decode, payload, stream=True)


def assert_pair_serves(prefill: LiveServer, decode: LiveServer) -> None:
    first, second = pair_request(prefill, decode, rng.getrandbits(63), input_ids=LONG_PROMPT[:40])
    for call in (first, second):
        call.join(120)
    assert first.status == 200 and second.status == 200 and second.done, (first.events, second.events)
    assert sum(len(e["output_ids"]) for e in second.events[-1:]) == 24, second.events[-1]


def kill_server(server: LiveServer) -> float:
    """SIGKILL the server and every process of it, at once (as an OOM kill of its container)."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    server.wait_exit(10)
    return killed


def scheduler_fds(server: LiveServer) -> int:
    pid = int(re.search(r"\[scheduler[^\]]* pid:(\d+)\]", server.log()).group(1))
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_hostile_input_runs_no_code_and_both_servers_keep_serving(servers, tmp_path):
    prefill, decode = servers["P1"], servers["D1"]
    marker = str(tmp_path / "code-ran")
    payload = pickle.dumps(Marker(marker))
    for garbage in (payload, b"\x00" * 19):  # not even ZMQ: the connection is dropped
        with socket.create_connection(("127.0.0.1", prefill.bootstrap_port)) as raw:
            raw.sendall(garbage)
    stranger = zmq.Context.instance().socket(zmq.DEALER)  # without the secret
    keys = channel.Keys.from_secret(None)
    stranger.curve_serverkey, stranger.curve_publickey, stranger.curve_secretkey = (
        keys.server_public, keys.client_public, keys.client_secret)
    stranger.connect(f"tcp://127.0.0.1:{prefill.bootstrap_port}")
    stranger.send(payload)
    assert stranger.poll(1500) == 0  # it learns nothing
    stranger.close(0)
    metrics = wait_metrics(prefill, lambda m: m.get('loupe_disaggregation_rejected_total{reason="handshake"}', 0) >= 2)
    assert metrics['loupe_disaggregation_rejected_total{reason="handshake"}'] >= 2
    # Bootstrap fields a decode server must not follow: a 400 naming the field, nothing opened.
    for bad, param in (({"bootstrap_port": -1}, "bootstrap_port"), ({"bootstrap_port": 70000}, "bootstrap_port"),
                       ({"bootstrap_room": 2**70}, "bootstrap_room"), ({"bootstrap_host": "0.0.0.0"}, "bootstrap_host"),
                       ({"bootstrap_host": ""}, "bootstrap_host")):
        r = httpx.post(decode.url("/generate"), json={**body(prefill, 1), **bad}, trust_env=False, timeout=30)
        assert_openai_error(r, 400, param)
    # Fifty requests naming fifty places nobody listens: each fails at once, no socket stays
    # (counted after a first one, which starts ZMQ's own threads).
    with httpx.Client(timeout=30, trust_env=False) as http:
        for i in range(51):
            if i == 1:
                before, started = scheduler_fds(decode), time.monotonic()
            payload = {**body(prefill, i, LONG_PROMPT[:8]), "bootstrap_port": free_port()}
            r = http.post(decode.url("/generate"), json=payload)
            assert r.status_code == 502 and "could not connect" in r.json()["error"]["message"], r.text
    assert (time.monotonic() - started) / 50 < 1
    time.sleep(0.5)
    assert scheduler_fds(decode) <= before
    assert not os.path.exists(marker)
    assert_pair_serves(prefill, decode)


def test_the_prefill_server_outlives_its_decode_server(servers):
    prefill, doomed, other = servers["P1"], servers["D1"], servers["D2"]
    before = read_metrics(prefill)
    calls = [pair_request(prefill, doomed, rng.getrandbits(63)) for _ in range(3)]
    time.sleep(0.5)  # claimed; the prompts run on the prefill server
    killed = kill_server(doomed)
    for prefill_call, _ in calls:
        prefill_call.join(60)
        assert prefill_call.status == 502 and prefill_call.ended - killed < FAILURE_BOUND_S, prefill_call.events
    metrics = wait_metrics(prefill, lambda m: m["loupe_kv_used_tokens"] == 0)
    assert metrics["loupe_kv_used_tokens"] == 0  # every page back
    assert metrics["loupe_kv_transfers_total"] == before["loupe_kv_transfers_total"]  # none counted as done
    assert metrics["loupe_kv_transfer_failures_total"] == before["loupe_kv_transfer_failures_total"] + 3
    assert "KV transfer failed: room" in prefill.log()
    assert_pair_serves(prefill, other)


def test_the_decode_server_outlives_its_prefill_server(servers):
    doomed, spare, decode = servers["P1"], servers["P2"], servers["D2"]
    before = read_metrics(decode)
    calls = [pair_request(doomed, decode, rng.getrandbits(63)) for _ in range(3)]
    time.sleep(0.5)
    killed = kill_server(doomed)
    for _, stream in calls:
        stream.join(60)
        assert stream.status == 200 and stream.done and "error" in stream.events[-1], stream.events
        assert stream.ended - killed < FAILURE_BOUND_S
        assert stream.events[-1]["error"]["code"] == "kv_transfer_failed"
    metrics = wait_metrics(decode, lambda m: m["loupe_kv_used_tokens"] == 0)
    assert metrics["loupe_kv_used_tokens"] == 0
    assert metrics["loupe_kv_transfer_failures_total"] == before["loupe_kv_transfer_failures_total"] + 3
    # A new request for the dead server fails at once; another prefill server serves.
    started = time.monotonic()
    r = httpx.post(decode.url("/generate"), json=body(doomed, 7), trust_env=False, timeout=60)
    assert r.status_code == 502 and time.monotonic() - started < 2, r.text
    assert_pair_serves(spare, decode)
