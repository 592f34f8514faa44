"""Soak a prefill/decode pair behind SGLang's router for minutes, restarting the prefill server
(SIGKILL, then a new one on the same ports) in the middle, then check that nothing leaked.

    .venv/bin/python benchmarks/soak_pd.py                    # 10 minutes, KV by nixl
    .venv/bin/python benchmarks/soak_pd.py --seconds 120 --backend tcp

A prefill server, a decode server (its decode step compiled, as served by default) sharing a
secret, and the router in PD mode, on loopback and the bundled model. --concurrency clients
send one request after another through the router: chat, completions and /generate, streamed
and not, with short and long (300-800 word) prompts and 1-64 new tokens. Every request must end
in one of two ways: answered (200, a finish reason, the tokens asked for), or failed with a
clear error (an HTTP error with a body, or a stream's error event followed by [DONE]). Anything
else is a failure: a connection cut, a stream without [DONE], no answer in two minutes.

Phases: long prompts that use every page of both KV caches once (their memory is mapped
lazily), prompts of 64 lengths (to fill oneDNN's per-shape matmul cache), warm-up (a tenth
of the run), then figures A for both servers with the load paused; load until half-way;
SIGKILL of the prefill server's process group and a new one started on the same HTTP and
bootstrap ports while the load goes on (requests fail clearly meanwhile); once it is back
and warmed the same way, figures A' for it; load to the end; figures B. Figures per process:
RSS, open file descriptors, threads; from /metrics: KV tokens held by requests, open
requests. Pass: every request answered or clearly failed, and clear failures only while the
prefill server was down (until the new one is ready, plus the router's circuit-breaker
timeout, set to 5 s here, plus 10 s); KV held by requests back to 0 on both sides; the
decode server's processes (alive the whole run) and the new prefill server's grew no
descriptors (the router's connections to the HTTP port aside) or threads, and under 5% RSS.
Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for harness
from bench_ab import cpu_model  # noqa: E402

from harness import LiveRouter, LiveServer, free_port, read_metrics  # noqa: E402

SECRET = "soak-pd-secret-0123456789"
MODEL = "SmolLM2-135M-Instruct"
REQUEST_TIMEOUT = 120.0
MAX_RSS_GROWTH = 0.05
KV_TOKENS = 8192
ROUTER_CB_TIMEOUT_S = 5  # the router tries a worker whose circuit it opened again after this (its default: 60)
GRACE_S = ROUTER_CB_TIMEOUT_S + 10.0  # after the new prefill server is ready, until the router uses it again
WORDS = ("river mountain city light stone window garden morning letter story music silver forest "
         "bridge market ocean cloud winter paper engine yellow quiet bright heavy walks reads opens").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


class Outcomes:
    def __init__(self):
        self.counts = Counter()  # (kind, "ok" | "clear error" | "failure")
        self.error_times: list[float] = []  # when clear errors came
        self.samples: list[str] = []

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.counts[kind, outcome] += 1
        if outcome == "clear error":
            self.error_times.append(time.monotonic())
        if outcome != "ok" and len(self.samples) < 12:
            self.samples.append(f"{kind} {outcome}: {detail[:160]}")


async def one(http: httpx.AsyncClient, rng: random.Random, out: Outcomes) -> None:
    route = rng.choice(("chat", "completion", "generate"))
    stream = rng.random() < 0.5
    text = words(rng, rng.choice((rng.randint(5, 60), rng.randint(300, 800))))
    tokens = rng.choice((1, 8, 16, 32, 64))
    if route == "chat":
        path, body = "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}],
                                              "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    elif route == "completion":
        path, body = "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": tokens, "temperature": 0,
                                         "ignore_eos": True}
    else:
        path, body = "/generate", {"text": text, "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}
    kind = f"{route}{' stream' if stream else ''}"
    try:
        if not stream:
            r = await http.post(path, json=body)
            if r.status_code == 200:
                out.add(kind, "ok")
            else:
                out.add(kind, "clear error" if r.content else "failure", f"{r.status_code} {r.text}")
            return
        async with http.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                out.add(kind, "clear error" if text else "failure", f"{r.status_code} {text}")
                return
            error = None
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    out.add(kind, "clear error" if error else "ok", error or "")
                    return
                if line.startswith("data: ") and '"error"' in line:
                    error = line[6:]
            out.add(kind, "failure", f"the stream ended without [DONE] (error event: {error})")
    except httpx.TimeoutException:
        out.add(kind, "failure", f"no answer within {REQUEST_TIMEOUT:.0f} s")
    except httpx.TransportError as e:
        out.add(kind, "failure", f"{type(e).__name__}: {e}")


async def load(url: str, concurrency: int, seconds: float, out: Outcomes, seed: int) -> None:
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, trust_env=False) as http:
            while time.monotonic() < stop:
                await one(http, rng, out)

    await asyncio.gather(*(client(i) for i in range(concurrency)))


async def fill_caches(url: str, out: Outcomes) -> None:
    """Long prompts at once, more than both KV caches hold: every page is used once, so the
    caches' memory (mapped lazily) is all there before the first figures."""
    rng = random.Random(7)

    async def fill(http: httpx.AsyncClient) -> None:
        r = await http.post("/generate", json={"text": words(rng, 900), "sampling_params": {"max_new_tokens": 4}})
        out.add("fill", "ok" if r.status_code == 200 else "clear error" if r.content else "failure", r.text)

    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, trust_env=False) as http:
        await asyncio.gather(*(fill(http) for _ in range(2 * KV_TOKENS // 1000)))


async def sweep_lengths(url: str, out: Outcomes, count: int = 64) -> None:
    """Prompts of `count` lengths across the load's range, two at a time: oneDNN keeps a matmul
    for each input shape (128 of them, model/layers.py), holding buffers as large as its rows,
    so a server's memory rises until that cache is full; this fills it before the figures."""
    lengths = iter(range(300, 900, 600 // count))
    rng = random.Random(11)

    async def sweep(http: httpx.AsyncClient) -> None:
        for n in lengths:
            r = await http.post("/generate", json={"text": words(rng, n), "sampling_params": {"max_new_tokens": 1}})
            out.add("sweep", "ok" if r.status_code == 200 else "clear error" if r.content else "failure", r.text)

    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, trust_env=False) as http:
        await asyncio.gather(sweep(http), sweep(http))


def figures(server: LiveServer) -> dict:
    """Per process of the server (main and children): (RSS, fds, threads), the fds without
    the connections clients (the router) keep open to its HTTP port; its KV and open requests."""
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    usage = {}
    for p in procs:
        name = "main" if p.pid == server.proc.pid else p.name()
        clients = sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port
                      for c in p.net_connections("tcp"))
        usage[f"{name} {p.pid}"] = (p.memory_info().rss, p.num_fds() - clients, p.num_threads())
    metrics = read_metrics(server)
    return {"usage": usage, "kv": metrics["loupe_kv_used_tokens"], "open": metrics["loupe_open_requests"]}


def settle(server: LiveServer, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        now = figures(server)
        if (now["kv"] == 0 and now["open"] == 0) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def compare(name: str, before: dict, after: dict) -> list[str]:
    problems = []
    print(f"{name}: KV held {after['kv']:.0f} tokens, open requests {after['open']:.0f}")
    for process, (rss, fds, threads) in before["usage"].items():
        if process not in after["usage"]:
            problems.append(f"{name} {process}: gone")
            continue
        rss2, fds2, threads2 = after["usage"][process]
        print(f"  {process:<28} RSS {rss / 2**20:7.1f} -> {rss2 / 2**20:7.1f} MB ({100 * (rss2 / rss - 1):+.1f}%)  "
              f"fds {fds} -> {fds2}  threads {threads} -> {threads2}")
        if rss2 > rss * (1 + MAX_RSS_GROWTH):
            problems.append(f"{name} {process}: RSS grew {100 * (rss2 / rss - 1):.1f}%")
        if fds2 > fds or threads2 > threads:
            problems.append(f"{name} {process}: fds {fds} -> {fds2}, threads {threads} -> {threads2}")
    if after["kv"] or after["open"]:
        problems.append(f"{name}: {after['kv']:.0f} KV tokens held, {after['open']:.0f} requests open at the end")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backend", choices=("nixl", "tcp"), default="nixl")
    parser.add_argument("--log-dir", default="/tmp/loupe-soak-pd")
    args = parser.parse_args()
    os.makedirs(args.log_dir, exist_ok=True)
    env = {"LOUPE_DISAGGREGATION_SECRET": SECRET, "UCX_NET_DEVICES": "lo"}
    flags = ("--disaggregation-transfer-backend", args.backend, "--max-total-tokens", KV_TOKENS)
    bootstrap, prefill_port = free_port(), free_port()

    def prefill_server() -> LiveServer:
        return LiveServer("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", bootstrap, *flags,
                          port=prefill_port, log_dir=args.log_dir, env=env).start()

    prefill = prefill_server()
    decode = LiveServer("--disaggregation-mode", "decode", *flags, log_dir=args.log_dir, env=env,
                        compile=True).start()  # as served by default: its int4 decode step compiled
    router = LiveRouter("--pd-disaggregation", "--prefill", prefill.base_url, bootstrap, "--decode", decode.base_url,
                        "--cb-timeout-duration-secs", ROUTER_CB_TIMEOUT_S, num_workers=2, log_dir=args.log_dir)
    out, problems = Outcomes(), []
    try:
        prefill.wait_ready()
        decode.wait_ready()
        router.start().wait_ready()
        print(f"{cpu_model()}, {os.cpu_count()} cores; {args.seconds:.0f} s, {args.concurrency} clients, KV by "
              f"{args.backend}; logs in {args.log_dir}", flush=True)
        warm = args.seconds / 10
        asyncio.run(fill_caches(router.base_url, out))
        asyncio.run(sweep_lengths(router.base_url, out))
        asyncio.run(load(router.base_url, args.concurrency, warm, out, 1))
        decode_before, old_prefill = settle(decode), settle(prefill)
        half = args.seconds / 2 - warm

        async def restart_in_the_middle() -> tuple[LiveServer, float, float]:
            loading = asyncio.ensure_future(load(router.base_url, args.concurrency, half, out, 2))
            await asyncio.sleep(half / 2)
            os.killpg(prefill.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            print(f"  {len(out.error_times)} clear errors so far; prefill server SIGKILLed", flush=True)
            prefill.wait_exit(10)
            prefill.stop()
            os.replace(prefill.log_path, prefill.log_path + ".killed")  # the new one writes the same path
            replacement = prefill_server()  # started from this thread: its parent-death signal follows the thread
            await asyncio.to_thread(replacement.wait_ready)
            back = time.monotonic()
            print(f"  a new prefill server is ready {back - killed:.1f} s after the kill", flush=True)
            await loading
            return replacement, killed, back

        new_prefill, killed, back = asyncio.run(restart_in_the_middle())
        asyncio.run(fill_caches(router.base_url, out))
        asyncio.run(sweep_lengths(router.base_url, out))
        asyncio.run(load(router.base_url, args.concurrency, min(60.0, warm), out, 3))
        new_before = settle(new_prefill)
        asyncio.run(load(router.base_url, args.concurrency, args.seconds / 2 - min(60.0, warm), out, 4))
        decode_after, new_after = settle(decode), settle(new_prefill)
        prefill = new_prefill
    finally:
        router.stop()
        prefill.stop()
        decode.stop()
    print("\noutcomes by kind of request:")
    for kind in sorted({k for k, _ in out.counts}):
        print(f"  {kind:<20} " + "  ".join(f"{o} {out.counts[kind, o]}" for o in ("ok", "clear error", "failure")
                                            if out.counts[kind, o]))
    for sample in out.samples:
        print("  e.g.", sample)
    failures = sum(n for (_, o), n in out.counts.items() if o == "failure")
    late = [t for t in out.error_times if not killed <= t <= back + GRACE_S]  # the router's own, or ours
    errors = [t - killed for t in out.error_times]
    print(f"clear errors: {len(errors)}, from {min(errors, default=0):.1f} to {max(errors, default=0):.1f} s after "
          f"the kill; the new prefill server was ready {back - killed:.1f} s after it")
    if failures:
        problems.append(f"{failures} requests neither answered nor clearly failed")
    if late:
        problems.append(f"{len(late)} clear errors outside the restart (kill .. ready + {GRACE_S:.0f} s)")
    problems += compare("decode server", decode_before, decode_after)
    problems += compare("new prefill server", new_before, new_after)
    print(f"old prefill server before its kill: KV held {old_prefill['kv']:.0f}, open {old_prefill['open']:.0f}")
    print("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
