"""Soak: one server under minutes of mixed load, traced at level 3, then a check that nothing leaked.

    .venv/bin/python benchmarks/soak.py                      # 20 minutes
    .venv/bin/python benchmarks/soak.py --seconds 60         # the test suite's version

The script starts its own server on the bundled model (loopback ports only), tracing at
level 3 over OTLP gRPC to a stand-in backend that answers without parsing (bench_tracing's).
--concurrency clients each send one request after another, of a kind drawn by weight (the
same sequence for a given --seed): chat, completions and /generate, streamed and not, with
1-64 new tokens; prompts that share long openings (prefix-cache hits); clients that give up
(a read timeout on a plain request; a stream closed after a few chunks); and bad requests
(invalid JSON, an unknown model, a prompt over the context, a body over the size limit, a
negative temperature), each of which must get its 4xx. Any other answer (a 5xx, a wrong
status or shape, no answer within two minutes) is a failure. The server runs one matmul
thread by default (--model-threads): the point is many requests of every kind, and on a
machine others share, two threads that wait for each other at every operation served a
twentieth as many.

Warm-up: first long prompts of their own fill the KV cache once (--kv-tokens; its memory is
mapped lazily, so a cache still filling would grow the scheduler's RSS with no leak behind
it), then the mixed load runs for a quarter of the run, at most 60 s. The load measured
after it lasts the rest of the run, at least half of it.

Figures are taken twice with the server idle (no client connected, every count settled):
after the warm-up and after the load. Per process of the server: RSS, open file
descriptors, threads. From /metrics: KV tokens held by requests and kept by the prefix
cache, open requests, spans exported / dropped / failed / still queued. Pass: every answer
as expected; each process's RSS grew under 5% and its descriptors and threads not at all;
no KV page held by a request (the prefix cache's evictable pages are counted apart); no
request open; no span waiting, none failed; no ERROR or traceback in the server's log.
Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import psutil
from bench_tracing import start_receiver

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for harness
from harness import LiveServer, parse_metrics  # noqa: E402

REQUEST_TIMEOUT = 120.0  # seconds: a request unanswered by then has hung
GIVE_UP_AFTER = 0.5  # seconds: an impatient client's read timeout (its request asks for 256 tokens)
MAX_RSS_GROWTH = 0.05
MAX_BODY_MB = 0.25  # the server's --max-request-body-mb: the over-long prompt still fits
WARM_UP_MAX_S = 60.0
CACHE_FULL = 0.9  # share of the KV cache in use or cached at which it counts as full
FILL_WORDS = 400  # words in each prompt that fills the cache (a word is a token or two)
IDLE_TIMEOUT = 60.0
WORDS = ("the a river mountain city light stone window garden morning evening letter story "
         "teacher doctor music silver forest bridge market ocean cloud winter summer paper "
         "engine number yellow quiet simple careful distant ancient bright heavy gentle "
         "walks builds reads opens carries follows watches remembers answers explains "
         "and but while because after before under over between across through").split()


class Unexpected(Exception):
    """An answer the request's kind does not allow: its status, its shape, or none in time."""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def new_tokens(rng: random.Random) -> int:
    return rng.choice((1, 2, 8, 16, 32, 64))


class Traffic:
    """The kinds of request, one method each; a method returns normally when the answer is
    the one its kind expects, else raises Unexpected."""

    WEIGHTS = {"chat": 3, "chat_stream": 3, "completion": 2, "completion_stream": 2, "generate": 2,
               "generate_stream": 1, "shared_prefix": 4, "give_up": 1, "disconnect": 1, "bad_json": 1,
               "unknown_model": 1, "too_long": 1, "too_large": 0.5, "bad_value": 1}

    def __init__(self, http: httpx.AsyncClient, model: str, context_length: int, seed: int):
        self.http, self.model, self.context_length = http, model, context_length
        rng = random.Random(seed)
        self.prefixes = [words(rng, 250) for _ in range(4)]
        self.prefix_hits = Counter()  # "hit" / "miss": shared-prefix requests with cached prompt tokens or none

    # ---- transport ------------------------------------------------------------------------

    async def post(self, path: str, body: dict | None = None, expect: int = 200, content: bytes | None = None,
                   timeout: float | httpx.Timeout = REQUEST_TIMEOUT) -> dict:
        try:
            r = await self.http.post(path, json=body, content=content, timeout=timeout,
                                     headers={"content-type": "application/json"})
        except httpx.TimeoutException as e:
            raise Unexpected(f"no answer within {REQUEST_TIMEOUT:.0f} s") from e
        except httpx.TransportError as e:
            raise Unexpected(f"{type(e).__name__}: {e}") from e
        if r.status_code != expect:
            raise Unexpected(f"{r.status_code} (expected {expect}): {r.text[:200]}")
        try:
            answer = r.json()
        except ValueError as e:
            raise Unexpected(f"{r.status_code} with a body that is not JSON: {r.text[:200]}") from e
        if expect != 200 and not isinstance(answer.get("error"), dict):
            raise Unexpected(f"{r.status_code} without an OpenAI error body: {r.text[:200]}")
        return answer

    async def stream(self, path: str, body: dict, leave_after: int | None = None) -> list[dict]:
        """The events of a streamed answer, to `data: [DONE]`; or the first `leave_after`,
        closing the connection while the server still generates."""
        events = []
        try:
            async with self.http.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    raise Unexpected(f"{r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return events
                    events.append(json.loads(line[6:]))
                    if len(events) == leave_after:
                        return events
        except httpx.TimeoutException as e:
            raise Unexpected(f"the stream stalled for {REQUEST_TIMEOUT:.0f} s") from e
        except httpx.TransportError as e:
            raise Unexpected(f"{type(e).__name__}: {e}") from e
        raise Unexpected(f"the stream ended without [DONE] after {len(events)} events")

    @staticmethod
    def finished(reason: object) -> None:
        if reason not in ("stop", "length"):
            raise Unexpected(f"finish reason {reason!r}")

    # ---- the kinds ------------------------------------------------------------------------

    def chat_body(self, rng: random.Random) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": words(rng, rng.randint(5, 60))}],
                "max_tokens": new_tokens(rng), "temperature": rng.choice((0.0, 0.8))}

    def completion_body(self, rng: random.Random) -> dict:
        return {"model": self.model, "prompt": words(rng, rng.randint(5, 120)), "max_tokens": new_tokens(rng),
                "temperature": rng.choice((0.0, 0.8))}

    def generate_body(self, rng: random.Random) -> dict:
        return {"text": words(rng, rng.randint(5, 120)), "sampling_params": {"max_new_tokens": new_tokens(rng)}}

    async def chat(self, rng: random.Random) -> None:
        self.finished((await self.post("/v1/chat/completions", self.chat_body(rng)))["choices"][0]["finish_reason"])

    async def chat_stream(self, rng: random.Random) -> None:
        self.finished((await self.stream("/v1/chat/completions", self.chat_body(rng)))[-1]["choices"][0]["finish_reason"])

    async def completion(self, rng: random.Random) -> None:
        self.finished((await self.post("/v1/completions", self.completion_body(rng)))["choices"][0]["finish_reason"])

    async def completion_stream(self, rng: random.Random) -> None:
        self.finished((await self.stream("/v1/completions", self.completion_body(rng)))[-1]["choices"][0]["finish_reason"])

    async def generate(self, rng: random.Random) -> None:
        self.finished((await self.post("/generate", self.generate_body(rng)))["meta_info"]["finish_reason"])

    async def generate_stream(self, rng: random.Random) -> None:
        self.finished((await self.stream("/generate", self.generate_body(rng)))[-1]["meta_info"]["finish_reason"])

    async def shared_prefix(self, rng: random.Random) -> None:
        """A long shared opening and a short question of its own, as chat (the opening as the
        system message) or as a completion."""
        prefix, question = rng.choice(self.prefixes), f"Question {rng.randint(1, 10**6)}: {words(rng, 8)}?"
        if rng.random() < 0.5:
            body = {"model": self.model, "max_tokens": new_tokens(rng),
                    "messages": [{"role": "system", "content": prefix}, {"role": "user", "content": question}]}
            answer = await self.post("/v1/chat/completions", body)
        else:
            answer = await self.post("/v1/completions", {"model": self.model, "max_tokens": new_tokens(rng),
                                                         "prompt": f"{prefix} {question}"})
        self.finished(answer["choices"][0]["finish_reason"])
        cached = answer["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
        self.prefix_hits["hit" if cached else "miss"] += 1

    async def give_up(self, rng: random.Random) -> None:
        """A plain request whose client stops waiting before the answer: the server aborts it."""
        body = {**self.completion_body(rng), "max_tokens": 256, "ignore_eos": True}
        try:
            await self.post("/v1/completions", body, timeout=httpx.Timeout(REQUEST_TIMEOUT, read=GIVE_UP_AFTER))
        except Unexpected as e:
            if not isinstance(e.__cause__, httpx.ReadTimeout):
                raise

    async def disconnect(self, rng: random.Random) -> None:
        """A stream closed after three chunks: the server aborts the request."""
        body = {**self.chat_body(rng), "max_tokens": 256, "ignore_eos": True}
        await self.stream("/v1/chat/completions", body, leave_after=3)

    async def bad_json(self, rng: random.Random) -> None:
        await self.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', expect=400)

    async def unknown_model(self, rng: random.Random) -> None:
        await self.post("/v1/chat/completions", {**self.chat_body(rng), "model": "no-such-model"}, expect=404)

    async def too_long(self, rng: random.Random) -> None:
        """A prompt over the context (every word is at least one token)."""
        body = {"model": self.model, "prompt": words(rng, self.context_length + 64), "max_tokens": 4}
        await self.post("/v1/completions", body, expect=400)

    async def too_large(self, rng: random.Random) -> None:
        body = {"model": self.model, "prompt": "x" * int(MAX_BODY_MB * 2**20 * 1.2), "max_tokens": 4}
        await self.post("/v1/completions", body, expect=413)

    async def bad_value(self, rng: random.Random) -> None:
        await self.post("/v1/chat/completions", {**self.chat_body(rng), "temperature": -1}, expect=400)


@dataclass
class Tally:
    ok: Counter
    unexpected: Counter
    seconds: Counter  # time from sending to the answer (or to giving up), summed per kind
    samples: list[str]  # the first few unexpected answers, for the report

    @classmethod
    def new(cls) -> Tally:
        return cls(Counter(), Counter(), Counter(), [])


async def client(traffic: Traffic, rng: random.Random, stop: asyncio.Event, tally: Tally) -> None:
    kinds, weights = list(Traffic.WEIGHTS), list(Traffic.WEIGHTS.values())
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        start = time.monotonic()
        try:
            await getattr(traffic, kind)(rng)
            tally.ok[kind] += 1
        except Unexpected as e:
            tally.unexpected[kind] += 1
            if len(tally.samples) < 10:
                tally.samples.append(f"{kind}: {e}")
        tally.seconds[kind] += time.monotonic() - start


async def load(traffic: Traffic, rngs: list[random.Random], tally: Tally, seconds: float) -> float:
    """Run the clients for `seconds`, then let each finish its request; the seconds it took."""
    start, stop = time.monotonic(), asyncio.Event()
    clients = [asyncio.create_task(client(traffic, rng, stop, tally)) for rng in rngs]
    await asyncio.wait(clients, timeout=seconds)
    stop.set()
    await asyncio.gather(*clients)
    return time.monotonic() - start


async def fill_cache(traffic: Traffic, kv_total: int) -> int:
    """Touch every page of the KV cache once (its memory is mapped lazily): long prompts of
    their own, one new token each, until requests and the prefix cache hold nearly all of it.
    The number of requests sent."""
    rng, sent = random.Random("fill"), 0
    while sent < 3 * kv_total // FILL_WORDS + 3:
        if kv_in_use(parse_metrics((await traffic.http.get("/metrics")).text)) >= CACHE_FULL * kv_total:
            break
        await traffic.post("/v1/completions", {"model": traffic.model, "prompt": words(rng, FILL_WORDS), "max_tokens": 1})
        sent += 1
    return sent


async def sample(server: Server, tally: Tally, every: float) -> None:
    """Every `every` seconds of the load, a line of each process's RSS, to tell a plateau
    from a steady climb."""
    start = time.monotonic()
    while True:
        await asyncio.sleep(every)
        rss = "  ".join(f"{name.split(' (')[0]} {u.rss / 2**20:.1f}" for name, u in server.usage().items() if u)
        print(f"  {time.monotonic() - start:5.0f} s, {sum(tally.ok.values()):5} requests: RSS MB {rss}", flush=True)


def kv_in_use(metrics: dict[str, float]) -> float:
    """KV tokens held by requests or kept by the prefix cache."""
    return metrics["loupe_kv_used_tokens"] + metrics["loupe_kv_cached_tokens"]


# ---- the server ----------------------------------------------------------------------------


@dataclass
class Usage:
    rss: int
    fds: int
    threads: int


class Server(LiveServer):
    """The soaked server on the bundled model, its decode step compiled as served by default."""

    def __init__(self, otlp_port: int, kv_tokens: int, model_threads: int, log_path: str):
        super().__init__("--enable-tracing", "--trace-level", 3, "--otlp-endpoint", f"127.0.0.1:{otlp_port}",
                         "--max-total-tokens", kv_tokens, "--max-request-body-mb", MAX_BODY_MB, log_path=log_path,
                         env={"OMP_NUM_THREADS": str(model_threads)}, compile=True, ready_timeout=600)
        self.http = httpx.Client(base_url=self.base_url, timeout=10, trust_env=False)

    def wait_ready(self, timeout: float | None = None) -> Server:
        """Ready; then its settings and its processes, as first seen."""
        super().wait_ready(timeout)
        self.info = self.http.get("/server_info").json()
        self.processes = {label(p): p for p in [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]}
        return self

    def stop(self) -> None:
        self.http.close()
        super().stop()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.http.get("/metrics").text)

    def wait_idle(self) -> tuple[dict[str, float], bool]:
        """/metrics once nothing runs, no request is open, no span waits in the exporter and
        the span counts have not moved for 2 s; and whether that happened in time."""
        deadline, last, still_since = time.monotonic() + IDLE_TIMEOUT, None, time.monotonic()
        while True:
            m = self.metrics()
            counts = tuple(m.get(f"loupe_tracing_spans_{k}_total", 0) for k in ("exported", "dropped", "failed"))
            quiet = all(m.get(k, 0) == 0 for k in ("loupe_num_running_reqs", "loupe_num_waiting_reqs",
                                                   "loupe_open_requests", "loupe_tracing_spans_queued"))
            if counts != last or not quiet:
                last, still_since = counts, time.monotonic()
            elif time.monotonic() - still_since >= 2:
                return m, True
            if time.monotonic() > deadline:
                return m, False
            time.sleep(0.25)

    def usage(self) -> dict[str, Usage | None]:
        """Per process (as first seen): RSS, open descriptors, threads; None if it is gone."""
        out = {}
        for name, p in self.processes.items():
            try:
                with p.oneshot():
                    out[name] = Usage(p.memory_info().rss, p.num_fds(), p.num_threads())
            except psutil.NoSuchProcess:
                out[name] = None
        return out

    def log_lines(self, *marks: str) -> Counter:
        return Counter(mark for line in self.log().splitlines() for mark in marks if mark in line)


def label(p: psutil.Process) -> str:
    """A server process's name: the main one, a child by the name it gives itself
    (process.setup_child), or multiprocessing's resource tracker."""
    if p.parent() is None or p.parent().pid == os.getpid():
        return f"main ({p.pid})"
    if "resource_tracker" in " ".join(p.cmdline()):
        return f"resource tracker ({p.pid})"
    return f"{p.name()} ({p.pid})"


# ---- the report ----------------------------------------------------------------------------


def verdict(tally: Tally, before: dict, after: dict, end: dict[str, float], idle: bool, log: Counter) -> list[str]:
    """The reasons to fail; none is a pass."""
    reasons = [f"{n} unexpected answers to {kind}" for kind, n in tally.unexpected.items()]
    for name, start in before.items():
        now = after[name]
        if start is None or now is None:
            reasons.append(f"{name} is gone")
            continue
        if now.rss > start.rss * (1 + MAX_RSS_GROWTH):
            reasons.append(f"{name}: RSS grew {100 * (now.rss / start.rss - 1):.1f}%")
        if now.fds > start.fds:
            reasons.append(f"{name}: {now.fds - start.fds} more open file descriptors")
        if now.threads > start.threads:
            reasons.append(f"{name}: {now.threads - start.threads} more threads")
    if not idle:
        reasons.append(f"the server did not settle within {IDLE_TIMEOUT:.0f} s of the load's end")
    for key, what in (("loupe_kv_used_tokens", "KV tokens still held by requests"),
                      ("loupe_open_requests", "requests still open on the HTTP side"),
                      ("loupe_num_running_reqs", "requests still running"),
                      ("loupe_num_waiting_reqs", "requests still waiting"),
                      ("loupe_tracing_spans_queued", "spans still queued in the exporter"),
                      ("loupe_tracing_spans_failed_total", "spans failed to export")):
        if end.get(key, 0):
            reasons.append(f"{end[key]:.0f} {what}")
    for mark, n in log.items():
        reasons.append(f"{n} server log lines with {mark.strip()!r}")
    return reasons


def report(args, server: Server, tally: Tally, traffic: Traffic, seconds: dict[str, float],
           before: dict, after: dict, end: dict[str, float], log: Counter) -> None:
    print(f"\nsoak: {seconds['load']:.0f} s of load after {seconds['warm-up']:.0f} s of warm-up, concurrency "
          f"{args.concurrency}, seed {args.seed}; server log {server.log_path}")
    print(f"\n{'kind':<18} {'as expected':>11} {'unexpected':>10} {'mean s':>7}")
    for kind in Traffic.WEIGHTS:
        n = tally.ok[kind] + tally.unexpected[kind]
        print(f"{kind:<18} {tally.ok[kind]:>11} {tally.unexpected[kind]:>10} {tally.seconds[kind] / max(n, 1):>7.2f}")
    total = sum(tally.ok.values()) + sum(tally.unexpected.values())
    hits = traffic.prefix_hits
    print(f"{'all':<18} {sum(tally.ok.values()):>11} {sum(tally.unexpected.values()):>10}   "
          f"({total / (seconds['warm-up'] + seconds['load']):.1f} req/s; shared-prefix requests with cached "
          f"prompt tokens: {hits['hit']} of {hits['hit'] + hits['miss']})")
    for sample in tally.samples:
        print(f"  unexpected: {sample}")
    print(f"\n{'process':<26} {'RSS after warm-up':>17} {'RSS at end':>11} {'growth':>7} {'fds':>9} {'threads':>9}")
    for name, start in before.items():
        now = after[name]
        if start is None or now is None:
            print(f"{name:<26} {'gone':>17}")
            continue
        print(f"{name:<26} {start.rss / 2**20:>14.1f} MB {now.rss / 2**20:>8.1f} MB "
              f"{100 * (now.rss / start.rss - 1):>+6.1f}% {start.fds:>4} {now.fds:>4} {start.threads:>4} {now.threads:>4}")
    page, total_tokens = server.info["page_size"], server.info["max_total_tokens"]
    used, cached = end["loupe_kv_used_tokens"], end["loupe_kv_cached_tokens"]
    print(f"\nKV cache: {total_tokens // page} pages of {page} tokens; held by requests {used / page:.0f}; "
          f"kept by the prefix cache (evictable) {cached / page:.0f}; free {(total_tokens - used - cached) / page:.0f}")
    print(f"open requests: HTTP side {end['loupe_open_requests']:.0f}, running {end['loupe_num_running_reqs']:.0f}, "
          f"waiting {end['loupe_num_waiting_reqs']:.0f}")
    tracing = server.http.get("/tracing").json()
    print(f"tracing: level {tracing.get('level')}; spans exported {end.get('loupe_tracing_spans_exported_total', 0):.0f}, "
          f"dropped {end.get('loupe_tracing_spans_dropped_total', 0):.0f}, "
          f"failed {end.get('loupe_tracing_spans_failed_total', 0):.0f}, "
          f"queued now {end.get('loupe_tracing_spans_queued', 0):.0f}; "
          f"exporter restarts {end.get('loupe_tracing_exporter_restarts_total', 0):.0f}")
    errors = ", ".join(f"{n} {m.strip()}" for m, n in log.items()) or "no errors"
    print(f"server log: {server.log_lines(' WARNING ')[' WARNING ']} warnings; {errors}")


async def run(args, server: Server) -> int:
    info = server.info
    warm_up = min(WARM_UP_MAX_S, args.seconds / 4)
    rngs = [random.Random(f"{args.seed}-{i}") for i in range(args.concurrency)]
    tally = Tally.new()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    # A client per phase: no connection stays open while the figures are taken.
    async with httpx.AsyncClient(base_url=server.base_url, timeout=REQUEST_TIMEOUT, limits=limits, trust_env=False) as http:
        model = (await http.get("/v1/models")).json()["data"][0]
        traffic = Traffic(http, model["id"], model["max_model_len"], args.seed)
        started = time.monotonic()
        filled_by = await fill_cache(traffic, info["max_total_tokens"])
        print(f"warm-up: the KV cache ({info['max_total_tokens']} tokens) filled by {filled_by} requests; "
              f"mixed load for {warm_up:.0f} s", flush=True)
        await load(traffic, rngs, tally, warm_up)
    start, idle = server.wait_idle()
    before = server.usage()
    warm_up_s = time.monotonic() - started
    rest = max(args.seconds - warm_up_s, args.seconds / 2)  # a warm-up that ran long leaves half the run
    print(f"warm-up took {warm_up_s:.0f} s ({100 * kv_in_use(start) / info['max_total_tokens']:.0f}% of the KV "
          f"cache cached now); load for {rest:.0f} s more", flush=True)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=REQUEST_TIMEOUT, limits=limits, trust_env=False) as http:
        traffic.http = http
        sampler = asyncio.create_task(sample(server, tally, args.sample_every))
        load_s = await load(traffic, rngs, tally, rest)
        sampler.cancel()
    seconds = {"warm-up": warm_up_s, "load": load_s}
    end, settled = server.wait_idle()
    after = server.usage()
    log = server.log_lines(" ERROR ", "Traceback")
    report(args, server, tally, traffic, seconds, before, after, end, log)
    reasons = verdict(tally, before, after, end, idle and settled, log)
    print("\nverdict: PASS" if not reasons else "\nverdict: FAIL\n" + "\n".join(f"  - {r}" for r in reasons))
    return 1 if reasons else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the run, warm-up included")
    parser.add_argument("--seconds", type=float, help="the length in seconds instead (short runs)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-tokens", type=int, default=8192, help="the server's --max-total-tokens (the warm-up "
                        "fills it)")
    parser.add_argument("--model-threads", type=int, default=1, help="the server's matmul threads "
                        "(OMP_NUM_THREADS; see above)")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds between RSS samples during the load")
    parser.add_argument("--log", help="the server's log file (default: in the temporary folder)")
    args = parser.parse_args()
    args.seconds = args.seconds if args.seconds is not None else 60 * args.minutes
    receiver, otlp_port = start_receiver()
    server = Server(otlp_port, args.kv_tokens, args.model_threads, args.log or os.path.join("/tmp", f"loupe-soak-{os.getpid()}.log"))
    try:
        server.start().wait_ready()
        status = asyncio.run(run(args, server))
    finally:
        server.stop()
        receiver.kill()
    sys.exit(status)


if __name__ == "__main__":
    main()
