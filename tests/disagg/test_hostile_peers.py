"""The bootstrap channel against peers that are hostile, wrong or dead, in process: a prefill
and a decode engine on a tiny model over real loopback sockets, and raw TCP and ZMQ clients
and servers playing the other side."""

import os
import pickle
import socket
import threading
import time

import pytest
import zmq
from test_exchange import PROMPTS, assert_nothing_held, decoder, pair, run, submit

from harness import free_port
from loupe.core import Bootstrap, SamplingParams, TokenizedRequest
from loupe.disagg import channel, wire

SECRET = "a-secret-of-sixteen-or-more"


class Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def curve_client(port: int, keys: channel.Keys | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            keys.server_public, keys.client_public, keys.client_secret)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def step_for(seconds: float, *engines) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for e in engines:
            e.scheduler.step()
        time.sleep(0.005)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_garbage_and_pickles_at_the_bootstrap_port_run_nothing_are_counted_and_it_keeps_serving(tiny_model_dir,
                                                                                                 tmp_path):
    prefill, decode, port = pair(tiny_model_dir("llama"))
    marker = str(tmp_path / "code-ran")
    payload = pickle.dumps(Marker(marker))
    with socket.create_connection(("127.0.0.1", port)) as raw:  # not even ZMQ
        raw.sendall(payload)
    plain = curve_client(port, None)  # ZMQ without the channel's encryption
    wrong = curve_client(port, channel.Keys.from_secret("another-secret-entirely"))
    right = curve_client(port, channel.Keys.from_secret(None))  # a peer with the key, sending junk
    for sock in (plain, wrong, right):
        sock.send(payload)
    right.send_multipart([b'{"v": 1, "kind": "claim", "room": "1; import os"}'])
    right.send_multipart([b'{"v": 9, "kind": "claim"}'])
    step_for(1.0, prefill)
    assert not os.path.exists(marker)
    handoff = prefill.scheduler.exchange.handoff
    counts = handoff.rejected.counts  # ZMQ clients try again after a refused handshake: each try counts
    assert counts["handshake"] >= 3 and counts["malformed"] == 2 and counts["version"] == 1
    assert right.poll(200) == 0  # junk gets no answer
    # The server lives and serves.
    submit(prefill, "p", PROMPTS[0], port, room=1)
    served = submit(decode, "d", PROMPTS[0], port, room=1)
    run(prefill, decode)
    assert served.error is None and len(served.output_ids) == 12
    for sock in (plain, wrong, right):
        sock.close(0)


def test_a_peer_without_the_secret_learns_nothing(tiny_model_dir):
    prefill, decode, port = pair(tiny_model_dir("llama"), prefill_secret=SECRET, decode_secret=SECRET)
    held = submit(prefill, "p", PROMPTS[0], port, room=5)
    run(prefill, until=lambda: prefill.scheduler.exchange.handoff.ready)  # prefilled, its KV waits for a claim
    claim = wire.Claim(5, len(held.prompt_ids), prefill.worker.kv_layout, "tcp")
    for keys in (None, channel.Keys.from_secret(None), channel.Keys.from_secret("a-guess-at-the-secret")):
        sock = curve_client(port, keys)
        sock.send_multipart(wire.encode(claim))
        step_for(0.5, prefill)
        assert sock.poll(100) == 0  # no KV, no layout, no refusal: nothing
        sock.close(0)
    assert 5 in prefill.scheduler.exchange.handoff.ready and prefill.scheduler.exchange.handoff.rejected.counts["handshake"] >= 3
    # A decode server with another secret fails at once, saying why; the right one is served.
    stranger = decoder(tiny_model_dir("llama"), secret="not-" + SECRET)
    refused = submit(stranger, "s", PROMPTS[0], port, room=5)
    start = time.monotonic()
    run(stranger, prefill, until=lambda: refused.finished)
    assert time.monotonic() - start < 5 and "--disaggregation-secret differs" in refused.error
    served = submit(decode, "d", PROMPTS[0], port, room=5)
    run(prefill, decode)
    assert served.error is None and len(served.output_ids) == 12


class Servers:
    """Fake servers on threads, stopped and joined on exit."""

    def __init__(self):
        self.stop, self.threads = threading.Event(), []

    def start(self, serve) -> None:
        self.threads.append(threading.Thread(target=serve, daemon=True))
        self.threads[-1].start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()


def fake_prefill_server(servers: Servers, answer, keys: channel.Keys | None) -> int:
    """A ROUTER that answers every message it gets with `answer` (a list of frames)."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_server, sock.curve_publickey, sock.curve_secretkey = True, keys.server_public, keys.server_secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def serve():
        while not servers.stop.is_set():
            if sock.poll(50):
                identity, *_ = sock.recv_multipart()
                sock.send_multipart([identity, *answer])
        sock.close(0)

    servers.start(serve)
    return port


def garbage_tcp_server(servers: Servers, payload: bytes) -> int:
    """Accepts connections and writes `payload` to each."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)

    def serve():
        while not servers.stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(payload)
        listener.close()

    servers.start(serve)
    return listener.getsockname()[1]


def test_a_fake_prefill_server_answering_garbage_runs_nothing_and_fails_the_request(tiny_model_dir, tmp_path):
    marker = str(tmp_path / "code-ran")
    payload = pickle.dumps(Marker(marker))
    decode = decoder(tiny_model_dir("llama"), timeout=3)
    intake = decode.scheduler.exchange.intake
    with Servers() as servers:
        # Not ZMQ at all, and ZMQ without the channel's keys: no handshake, failed at once.
        for port in (garbage_tcp_server(servers, payload * 4), fake_prefill_server(servers, [payload], None)):
            lost = submit(decode, f"d{port}", PROMPTS[0], port, room=port)
            start = time.monotonic()
            run(decode, until=lambda lost=lost: lost.finished)
            assert time.monotonic() - start < 5 and "handshake" in lost.error, lost.error
        # A server holding the key that answers a pickle and junk: dropped and counted; the
        # request waits for real KV until its timeout.
        port = fake_prefill_server(servers, [payload], channel.Keys.from_secret(None))
        junk_port = fake_prefill_server(servers, [b'{"v": 1, "kind": "kv", "room": 1}'], channel.Keys.from_secret(None))
        waiting = [submit(decode, f"k{p}", PROMPTS[0], p, room=p) for p in (port, junk_port)]
        run(decode, until=lambda: all(r.finished for r in waiting))
        assert all("did not come within 3 s" in r.error for r in waiting)
        assert intake.rejected.counts == {"malformed": 2}
    assert not os.path.exists(marker)
    assert_nothing_held(decode)


def test_an_address_zmq_cannot_parse_fails_its_request_not_the_server(tiny_model_dir):
    decode = decoder(tiny_model_dir("llama"))
    req = decode.scheduler.add_request(TokenizedRequest("d", decode.tokenizer.encode(PROMPTS[0]),
                                                        SamplingParams(max_new_tokens=2),
                                                        bootstrap=Bootstrap("-x", 8998, 1)))
    run(decode)
    assert "could not connect to the prefill server at -x:8998" in req.error
    assert_nothing_held(decode)


def test_fifty_distinct_bad_peers_leave_no_socket_open(tiny_model_dir):
    decode = decoder(tiny_model_dir("llama"), max_running_requests=64)
    intake = decode.scheduler.exchange.intake
    submit(decode, "warm", PROMPTS[0], free_port(), room=0)  # ZMQ's own threads and sockets, once
    run(decode)
    before = open_fds()
    with Servers() as servers:
        ports = [free_port() for _ in range(45)] + [garbage_tcp_server(servers, b"\x00" * 64) for _ in range(5)]
        reqs = [submit(decode, f"d{i}", PROMPTS[0], port, room=i) for i, port in enumerate(ports)]
        run(decode, seconds=20)
    assert all("could not connect" in r.error or "handshake" in r.error for r in reqs)
    assert intake.links == {} and open_fds() <= before
    assert_nothing_held(decode)


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_a_prefill_server_that_goes_away_fails_its_waiting_requests_at_once(tiny_model_dir, backend):
    prefill, decode, port = pair(tiny_model_dir("llama"), timeout=60, decode_timeout=60, backend=backend)
    waiting = submit(decode, "d", PROMPTS[0], port, room=3)  # claimed; its prefill never runs
    step_for(0.3, prefill, decode)
    assert decode.scheduler.exchange.intake.pending == 1
    prefill.scheduler.exchange.handoff.close()
    start = time.monotonic()
    run(decode, until=lambda: waiting.finished)
    assert time.monotonic() - start < 2 and "lost the connection to the prefill server" in waiting.error
    assert_nothing_held(decode)


def test_a_decode_server_that_goes_away_before_confirming_is_a_failed_transfer(tiny_model_dir):
    prefill, decode, port = pair(tiny_model_dir("llama"), timeout=60, decode_timeout=60)
    sent = submit(prefill, "p", PROMPTS[0], port, room=4)
    run(prefill, until=lambda: prefill.scheduler.exchange.handoff.ready)
    submit(decode, "d", PROMPTS[0], port, room=4)
    decode.scheduler.step()  # its claim leaves
    run(prefill, until=lambda: prefill.scheduler.exchange.handoff.sent)  # the KV left; no receipt yet
    decode.scheduler.exchange.intake.close()  # the decode server dies before it reads the KV
    start = time.monotonic()
    run(prefill, until=lambda: sent.finished)
    assert time.monotonic() - start < 2.5 and "went away before confirming" in sent.error
    assert sent.kv_bytes == 0 and sent.kv_transfer is None  # never counted as moved
    assert_nothing_held(prefill)


def test_a_claim_for_a_room_the_prefill_server_never_got_is_refused_in_seconds(tiny_model_dir):
    prefill, decode, port = pair(tiny_model_dir("llama"), timeout=60, decode_timeout=60)
    lost = submit(decode, "d", PROMPTS[0], port, room=2**64 - 1)
    start = time.monotonic()
    run(prefill, decode, until=lambda: lost.finished)
    assert time.monotonic() - start < 5 and "has no request for room" in lost.error
    assert_nothing_held(decode)


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    zmq.Context.instance().destroy(linger=0)
