"""Prefill/decode disaggregation on this machine, side by side with one server.

Configs, every server up at once (idle ones cost nothing), the bundled model, the same load
(`loupe bench`: streaming completions) in rounds that alternate their order:

    one server                 clients talk to a loupe server directly (the baseline)
    router + one server        SGLang's router in front of it
    router + PD (nixl)         the router in PD mode over a prefill and a decode server, KV by NIXL
    router + PD (tcp)          the same, KV as ZMQ frames

Prints medians of output tok/s, TTFT and e2e latency with their ratios to the baseline. Then
long prompts: ~2k-token prompts (fresh ones each time, so no prefix is reused) with 8-token
answers, one alone and then two at once, through each config; the ratio of the two-at-once
wall time to one alone (2.0 when the two simply share the machine).
First, in this process, the KV exchange alone: a prefill side and a decode side (the classes
the servers run, over a real loopback bootstrap socket, each backend) move one request's KV
of the bundled model's shape, both polled in a tight loop; time from claim to arrival,
checked byte for byte.

    .venv/bin/python benchmarks/bench_disaggregation.py --rounds 3
    .venv/bin/python benchmarks/bench_disaggregation.py --transfer-only --tokens 512 2048 8192
    .venv/bin/python benchmarks/bench_disaggregation.py --long-only --long-rounds 6 --backends tcp \
        --spincounts 300000 10000     # two pairs side by side: libgomp's spin, and what loupe sets
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import statistics
import sys
import time
from types import SimpleNamespace

import httpx
from bench_ab import cpu_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for harness
from harness import LiveRouter, LiveServer, free_port  # noqa: E402
from loupe.bench import run as run_load  # noqa: E402

BASELINE = "one server"
LONG_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def bench_server(*flags: object, env: dict | None = None) -> LiveServer:
    """A server on the bundled model, its decode step compiled as served by default."""
    return LiveServer(*flags, env=env, compile=True, ready_timeout=600)


def kv_rate(port: int) -> tuple[float, float]:
    """(MB moved, MB/s while moving) of a prefill server's KV transfers so far."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("loupe_kv")}
    megabytes = values.get("loupe_kv_transfer_bytes_total", 0) / 1e6
    seconds = values.get("loupe_kv_transfer_seconds_sum", 0)
    return megabytes, megabytes / seconds if seconds else float("nan")


def long_prompt(seed: int, words: int = 1500) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(LONG_WORDS) for _ in range(words))


async def timed_completions(url: str, model: str, seeds: list[int]) -> float:
    """Seconds until every one of these long-prompt requests (sent at once) has its answer."""
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(client.post(url + "/v1/completions", json={
            "model": model, "prompt": long_prompt(seed), "max_tokens": 8, "temperature": 0}) for seed in seeds))
        assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers]
        return time.perf_counter() - start


def concurrent_long_prompts(urls: dict[str, str], model: str, rounds: int) -> None:
    seed = 10_000
    ratios: dict[str, list[float]] = {name: [] for name in urls}
    for r in range(rounds):
        for name in list(urls) if r % 2 == 0 else reversed(list(urls)):
            alone = asyncio.run(timed_completions(urls[name], model, [seed]))
            together = asyncio.run(timed_completions(urls[name], model, [seed + 1, seed + 2]))
            seed += 3
            ratios[name].append(together / alone)
            print(f"round {r + 1} {name:>20}: one alone {alone:.2f} s, two at once {together:.2f} s",
                  file=sys.stderr)
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; long prompts (~2k tokens, 8-token answers), {rounds} rounds: "
          "two at once / one alone, median (min-max)")
    for name, values in ratios.items():
        print(f"{name:>32} {statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})")


def transfer_seconds(backend: str, num_tokens: int, repeats: int) -> list[float]:
    """Claim-to-arrival times of one request's KV (SmolLM2-135M's shape: 30 layers, 3 KV heads
    of 64, float32, pages of 16) between the two sides of a pair, in this process."""
    import torch

    from loupe.core import Bootstrap, KVLayout
    from loupe.disagg.decode import DecodeIntake
    from loupe.disagg.prefill import PrefillHandoff
    from loupe.model.attention import KVCache

    page, pages = 16, list(range(1, -(-num_tokens // 16) + 1))
    caches = [KVCache(30, (len(pages) + 1) * page, 3, 64, torch.float32, "cpu") for _ in range(2)]
    for t in (caches[0].k, caches[0].v):
        t.copy_(torch.randn_like(t))
    layout, port = KVLayout(30, 3, 64, "float32", page), free_port()
    handoff = PrefillHandoff("127.0.0.1", port, caches[0], layout, 60, backend)
    intake = DecodeIntake(caches[1], layout, 60, backend)
    times = []
    for room in range(repeats):
        sent, received = (SimpleNamespace(rid=str(room), prompt_ids=[0] * num_tokens, output_ids=first,
                                          pages=list(pages), kv_bytes=0, kv_transfer=None, error=None,
                                          bootstrap=Bootstrap("127.0.0.1", port, room)) for first in ([7], []))
        handoff.hand_off(sent)
        start = time.perf_counter()
        intake.claim(received)
        while not received.output_ids and not received.error:
            handoff.poll()
            intake.poll()
        times.append(time.perf_counter() - start)
        assert received.error is None and received.output_ids == [7], received.error
    for t in range(2):
        cache = (caches[1].k, caches[1].v)[t][:, page: (len(pages) + 1) * page][:, :num_tokens]
        assert torch.equal(cache, (caches[0].k, caches[0].v)[t][:, page: (len(pages) + 1) * page][:, :num_tokens])
    handoff.close()
    intake.close()
    return times


def transfers(token_counts: list[int], repeats: int) -> None:
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    print(f"{cpu_model()}, {os.cpu_count()} cores; one request's KV, claim to arrival, median of {repeats}")
    print(f"{'tokens':>7} {'MB':>7} " + " ".join(f"{b + ' ms':>10} {b + ' MB/s':>10}" for b in ("nixl", "tcp")))
    for n in token_counts:
        megabytes = 2 * 30 * 3 * 64 * 4 * n / 1e6
        medians = {b: statistics.median(transfer_seconds(b, n, repeats)) for b in ("nixl", "tcp")}
        print(f"{n:>7} {megabytes:7.1f} " + " ".join(f"{medians[b] * 1e3:10.1f} {megabytes / medians[b]:10.0f}"
                                                       for b in ("nixl", "tcp")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192],
                        help="prompt lengths whose KV the transfer measure moves")
    parser.add_argument("--transfer-only", action="store_true", help="only the KV exchange, in this process")
    parser.add_argument("--long-rounds", type=int, default=3, help="rounds of the long-prompt measure (0: skip)")
    parser.add_argument("--long-only", action="store_true", help="only the long-prompt measure (no load rounds)")
    parser.add_argument("--max-total-tokens", type=int, default=8192, help="each server's KV cache: many servers "
                        "share this machine's memory (by default each would size its cache from all that is free)")
    parser.add_argument("--backends", nargs="+", default=["nixl", "tcp"], choices=["nixl", "tcp"])
    parser.add_argument("--spincounts", type=int, nargs="+", help="a pair per backend per GOMP_SPINCOUNT value "
                        "(default: one pair per backend, with the servers' own setting)")
    args = parser.parse_args()
    if not args.long_only:
        transfers(args.tokens, repeats=5)
    if args.transfer_only:
        return
    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # both ends here: keep UCX on loopback
    kv = ("--max-total-tokens", args.max_total_tokens)
    urls, prefills = {}, {}
    with contextlib.ExitStack() as servers:  # each started once the one before is ready; all stopped at the end
        single = servers.enter_context(bench_server(*kv))
        urls[BASELINE] = single.base_url
        model = single.served_model()
        urls["router + one server"] = servers.enter_context(
            LiveRouter("--worker-urls", single.base_url, num_workers=1, ready_timeout=300)).base_url
        for backend, spin in itertools.product(args.backends, args.spincounts or [None]):
            env = None if spin is None else {"GOMP_SPINCOUNT": str(spin)}
            name = f"{backend}, spin {spin}" if spin is not None else backend
            bootstrap = free_port()
            prefill = servers.enter_context(bench_server(
                "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", bootstrap,
                "--disaggregation-transfer-backend", backend, *kv, env=env))
            decode = servers.enter_context(bench_server(
                "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", backend, *kv, env=env))
            router = servers.enter_context(LiveRouter("--pd-disaggregation", "--prefill", prefill.base_url, bootstrap,
                                                      "--decode", decode.base_url, num_workers=2, ready_timeout=300))
            urls[f"router + PD ({name})"] = router.base_url
            prefills[name] = prefill
        for url in urls.values():  # warm every path once
            asyncio.run(run_load(url, model, 2, 2, 99, None))
        if args.long_rounds:
            concurrent_long_prompts({name: url for name, url in urls.items() if name != "router + one server"},
                                    model, args.long_rounds)
        if args.long_only:
            return
        results: dict[str, list[dict]] = {name: [] for name in urls}
        for r in range(args.rounds):
            for name in list(urls) if r % 2 == 0 else reversed(list(urls)):
                summary = asyncio.run(run_load(urls[name], model, args.concurrency, args.num_requests, r, None))
                assert summary["failed"] == 0, summary
                results[name].append(summary)
                print(f"round {r + 1} {name:>20}: {summary['output_tokens_per_s']:6.1f} tok/s, TTFT p50 "
                      f"{summary['ttft_p50_s']:.3f} s, e2e p50 {summary['e2e_p50_s']:.3f} s", file=sys.stderr)
        rates = {backend: kv_rate(server.port) for backend, server in prefills.items()}

    def median(name: str, key: str) -> float:
        return statistics.median(s[key] for s in results[name])

    print(f"\n{cpu_model()}, {os.cpu_count()} cores; concurrency {args.concurrency}, {args.num_requests} requests "
          f"a run, {args.rounds} rounds, medians")
    print(f"{'config':>20} {'tok/s':>8} {'vs one':>7} {'TTFT p50 s':>11} {'vs one':>7} {'e2e p50 s':>10} {'vs one':>7}")
    for name in urls:
        tps, ttft, e2e = (median(name, k) for k in ("output_tokens_per_s", "ttft_p50_s", "e2e_p50_s"))
        print(f"{name:>20} {tps:8.1f} {tps / median(BASELINE, 'output_tokens_per_s'):7.3f} {ttft:11.3f} "
              f"{ttft / median(BASELINE, 'ttft_p50_s'):7.3f} {e2e:10.3f} {e2e / median(BASELINE, 'e2e_p50_s'):7.3f}")
    for backend, (megabytes, rate) in rates.items():
        print(f"KV moved by {backend}: {megabytes:.1f} MB in all, {rate:.0f} MB/s while moving (prefill server's view)")


if __name__ == "__main__":
    main()
