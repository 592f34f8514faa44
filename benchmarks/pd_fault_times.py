"""How long each fault of a prefill/decode pair takes to reach the client as an error, per
transfer backend, on the bundled model (docs/disaggregation.md's failure table).

Requests go to both halves at once with bootstrap fields, as SGLang's router sends them; the
decode server's answer is a stream. Each fault is timed from the moment it happens (the
request sent, or the SIGKILL) to the error (a 502, or the stream's error event):

    nothing listens at bootstrap_port           connection refused
    a silent listener                           accepts TCP, never answers the handshake
    another --disaggregation-secret             the handshake fails
    a room the prefill server never got         its refusal (after its grace for late requests)
    prefill server SIGKILLed mid-request        the decode server's streams end with an error
    decode server SIGKILLed mid-request         the prefill server's answers are 502s

    .venv/bin/python benchmarks/pd_fault_times.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for harness
from bench_ab import cpu_model  # noqa: E402

from harness import LiveServer, free_port, running  # noqa: E402

SECRET = "pd-fault-times-0123456789"
rng = random.Random(5)
PROMPT = [rng.randrange(1000, 40000) for _ in range(900)]


def payload(bootstrap_port: int, room: int, stream: bool) -> dict:
    return {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap_port, "bootstrap_room": room, "stream": stream}


def failed_at(server: LiveServer, body: dict) -> float:
    """When the request failed (monotonic); raises if it did not."""
    with httpx.Client(timeout=300, trust_env=False) as http:
        if not body["stream"]:
            r = http.post(server.url("/generate"), json=body)
            assert r.status_code == 502, r.text
            return time.monotonic()
        with http.stream("POST", server.url("/generate"), json=body) as r:
            if r.status_code == 502:
                return time.monotonic()
            for line in r.iter_lines():
                if line.startswith("data: ") and '"error"' in line:
                    return time.monotonic()
    raise AssertionError("the request did not fail")


def quietly(server: LiveServer, body: dict) -> None:
    """The other half's request, whose server is about to die."""
    try:
        httpx.post(server.url("/generate"), json=body, timeout=300, trust_env=False)
    except httpx.TransportError:
        pass


class InThread(threading.Thread):
    """`function(*args)` on a thread; `result` once joined."""

    def __init__(self, function, *args):
        super().__init__(daemon=True)
        self.function, self.args, self.result = function, args, None
        self.start()

    def run(self):
        self.result = self.function(*self.args)


def silent_listener() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: [listener.accept() for _ in range(1000)], daemon=True).start()
    return listener


def measure(backend: str, repeats: int, log_dir: str) -> dict[str, list[float]]:
    env = {"LOUPE_DISAGGREGATION_SECRET": SECRET, "UCX_NET_DEVICES": "lo"}
    common = ("--disaggregation-transfer-backend", backend, "--max-total-tokens", 8192)

    def pd_server(mode: str, extra_env: dict | None = None) -> LiveServer:
        port = free_port()
        args = ("--disaggregation-bootstrap-port", port) if mode == "prefill" else ()
        server = LiveServer("--disaggregation-mode", mode, *args, *common, log_dir=log_dir,
                            env={**env, **(extra_env or {})})
        server.bootstrap_port = port
        return server

    decode = pd_server("decode")
    stranger = pd_server("decode", {"LOUPE_DISAGGREGATION_SECRET": "another-secret-0123456789"})
    prefills = [pd_server("prefill") for _ in range(repeats)]
    victims = [pd_server("decode") for _ in range(repeats)]
    times: dict[str, list[float]] = {}
    with running(decode, stranger, *prefills, *victims):
        listener = silent_listener()
        for _ in range(repeats):
            for name, server, port in (("connection refused", decode, free_port()),
                                       ("a silent listener", decode, listener.getsockname()[1]),
                                       ("another secret", stranger, prefills[-1].bootstrap_port),
                                       ("an unknown room", decode, prefills[-1].bootstrap_port)):
                start_at = time.monotonic()
                times.setdefault(name, []).append(failed_at(server, payload(port, rng.getrandbits(63), True))
                                                  - start_at)
        for prefill, victim in zip(prefills, victims, strict=True):
            # The decode server dies while the prompt runs on the prefill server.
            room = rng.getrandbits(63)
            answer = InThread(failed_at, prefill, payload(prefill.bootstrap_port, room, False))
            InThread(quietly, victim, payload(prefill.bootstrap_port, room, True))
            time.sleep(0.5)
            os.killpg(victim.proc.pid, 9)
            killed = time.monotonic()
            answer.join(300)
            times.setdefault("decode server SIGKILLed", []).append(answer.result - killed)
            # The prefill server dies while the decode server waits for the KV.
            room = rng.getrandbits(63)
            InThread(quietly, prefill, payload(prefill.bootstrap_port, room, False))
            stream = InThread(failed_at, decode, payload(prefill.bootstrap_port, room, True))
            time.sleep(0.5)
            os.killpg(prefill.proc.pid, 9)
            killed = time.monotonic()
            stream.join(300)
            times.setdefault("prefill server SIGKILLed", []).append(stream.result - killed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log-dir", default="/tmp/loupe-pd-fault-times")
    args = parser.parse_args()
    os.makedirs(args.log_dir, exist_ok=True)
    results = {backend: measure(backend, args.repeats, args.log_dir) for backend in ("nixl", "tcp")}
    print(f"{cpu_model()}, {os.cpu_count()} cores; seconds from the fault to the client's error, median (max) "
          f"of {args.repeats}")
    print(f"{'fault':>28} " + " ".join(f"{b:>14}" for b in results))
    for fault in results["nixl"]:
        print(f"{fault:>28} " + " ".join(f"{statistics.median(r[fault]):6.2f} ({max(r[fault]):5.2f})"
                                         for r in results.values()))


if __name__ == "__main__":
    main()
