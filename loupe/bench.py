"""`loupe bench`: load a running server with concurrent requests and report request
throughput, output tokens/s, time to first token and end-to-end latency.

Two loads: streamed completions (`/v1/completions`, the default), where the first text event
times the first token; and, with `--chat`, chat completions answered whole
(`/v1/chat/completions`, not streamed), where only end-to-end latency is seen."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import httpx

WORDS = ("time request trace span queue prefill decode token cache batch server model latency "
         "answer question where went how long why fast slow first last every step").split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    error: str = ""
    asked_tokens: int = 0
    prompt_tokens: int = 0
    ttft_seen: bool = True  # False where the answer came whole (chat, not streamed)


PROMPT_WORDS = (20, 60)


def make_prompts(n: int, seed: int, max_tokens: int | None = None,
                 words: tuple[int, int] = PROMPT_WORDS) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs: `words` words (about a token each), 16-160 output tokens (or all
    `max_tokens`), reproducible: the prompts of a seed are the same either way."""
    rng = random.Random(seed)
    pairs = [(" ".join(rng.choices(WORDS, k=rng.randint(*words))), rng.randint(16, 160)) for _ in range(n)]
    return [(prompt, max_tokens or drawn) for prompt, drawn in pairs]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      headers: dict) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, usage = None, {}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                return Result(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text") and ttft is None:
                    ttft = time.perf_counter() - start
                usage = event.get("usage") or usage
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - start
    return Result(True, ttft if ttft is not None else e2e, e2e, usage.get("completion_tokens", 0),
                  asked_tokens=max_tokens, prompt_tokens=usage.get("prompt_tokens", 0))


async def one_chat(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                   headers: dict) -> Result:
    """A chat completion answered whole: no first token to time."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    try:
        response = await client.post(url, json=body, headers=headers)
        if response.status_code != 200:
            return Result(False, error=f"HTTP {response.status_code}: {response.content[:200]!r}")
        usage = response.json().get("usage") or {}
    except (httpx.HTTPError, ValueError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - start
    return Result(True, e2e, e2e, usage.get("completion_tokens", 0), asked_tokens=max_tokens,
                  prompt_tokens=usage.get("prompt_tokens", 0), ttft_seen=False)


async def run(base_url: str, model: str, concurrency: int, num_requests: int, seed: int,
              api_key: str | None, max_tokens: int | None = None, keepalive: bool = True,
              chat: bool = False, words: tuple[int, int] = PROMPT_WORDS) -> dict:
    prompts = make_prompts(num_requests, seed, max_tokens, words)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    one = one_chat if chat else one_request
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=None if keepalive else 0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def bounded(prompt: str, max_tokens: int) -> Result:
            async with limit:
                return await one(client, url, model, prompt, max_tokens, headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p, m) for p, m in prompts))
        wall = time.perf_counter() - start
    return summarize(results, wall, concurrency)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(results: list[Result], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    ttft, e2e = [r.ttft for r in ok if r.ttft_seen], [r.e2e for r in ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": round(wall, 2),
        "request_throughput": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(sum(r.output_tokens for r in ok) / wall, 1),
        # answers whose reported completion_tokens differ from max_tokens (ignore_eos not honoured?)
        "wrong_lengths": sum(r.output_tokens != r.asked_tokens for r in ok),
        "prompt_tokens_mean": round(statistics.mean(r.prompt_tokens for r in ok), 1) if ok else None,
        # prompt tokens over time to first token, request by request (streamed loads only)
        "prefill_tokens_per_s_p50": round(statistics.median(r.prompt_tokens / r.ttft for r in ok if r.ttft_seen), 1)
        if ttft else None,
        "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
        "ttft_p90_s": round(percentile(ttft, 0.90), 4) if ttft else None,
        "ttft_p99_s": round(percentile(ttft, 0.99), 4) if ttft else None,
        "e2e_p50_s": round(statistics.median(e2e), 4) if e2e else None,
        "e2e_p90_s": round(percentile(e2e, 0.90), 4),
        "e2e_p99_s": round(percentile(e2e, 0.99), 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loupe bench", description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:30000", help="the server to load")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--num-requests", type=int, default=None, help="default: 4 x concurrency")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and lengths")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="every answer this long (default: each drawn from 16-160)")
    parser.add_argument("--no-keepalive", action="store_true",
                        help="a fresh connection for every request (llama-server closes its connection after "
                             "each streamed answer without saying so: a reused one can fail under load)")
    parser.add_argument("--chat", action="store_true",
                        help="chat completions answered whole (not streamed) instead of streamed completions")
    parser.add_argument("--prompt-words", type=int, nargs=2, default=PROMPT_WORDS, metavar=("LOW", "HIGH"),
                        help="each prompt this many words, drawn from LOW-HIGH (about a token each)")
    parser.add_argument("--api-key", default=None, help="bearer key, if the server wants one")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers).json()["data"][0]["id"]
    num = args.num_requests or 4 * args.concurrency
    summary = asyncio.run(run(args.base_url, model, args.concurrency, num, args.seed, args.api_key,
                              args.max_tokens, not args.no_keepalive, args.chat, tuple(args.prompt_words)))
    if args.json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        print(f"{key:>20}  {value}")


if __name__ == "__main__":
    main()
