"""64 concurrent streaming chat clients on the bundled model while /health stays responsive."""

import asyncio
import threading
import time

import httpx
import openai
import pytest

from harness import BUNDLED_NAME, read_metrics, wait_metrics

pytestmark = pytest.mark.slow  # it starts servers

CLIENTS = 64
TOPICS = ["cats", "the sea", "Paris", "bread", "rain", "music", "stars", "trains"]


class HealthProbe(threading.Thread):
    """GET /health every 0.2 s in its own thread; records each answer's status and latency."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.stopped, self.results = server, threading.Event(), []

    def run(self):
        with httpx.Client(timeout=5, trust_env=False) as http:
            while not self.stopped.is_set():
                start = time.monotonic()
                try:
                    status = http.get(self.server.url("/health")).status_code
                except httpx.HTTPError as e:
                    status = repr(e)
                self.results.append((status, time.monotonic() - start))
                self.stopped.wait(0.2)


async def one_client(client, i):
    max_tokens = 16 + i % 17  # 16..32
    messages = [{"role": "user", "content": f"Say something short about {TOPICS[i % len(TOPICS)]}. ({i})"}]
    stream = await client.chat.completions.create(
        model=BUNDLED_NAME, messages=messages, max_tokens=max_tokens, temperature=0.7, seed=i,
        stream=True, stream_options={"include_usage": True})
    content, reasons, usages = "", [], []
    async for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            content += choice.delta.content or ""
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    return max_tokens, content, reasons, usages


async def run_clients(server):
    async with openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=300) as client:
        return await asyncio.gather(*(one_client(client, i) for i in range(CLIENTS)), return_exceptions=True)


def test_64_concurrent_streams_while_health_answers(bundled_server):
    probe = HealthProbe(bundled_server)
    probe.start()
    start = time.monotonic()
    try:
        results = asyncio.run(run_clients(bundled_server))
    finally:
        probe.stopped.set()
        probe.join(10)
    elapsed = time.monotonic() - start
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    for max_tokens, content, reasons, usages in results:
        assert len(reasons) == 1 and reasons[0] in ("stop", "length"), reasons
        assert len(usages) == 1, usages
        u = usages[0]
        assert 0 < u.completion_tokens <= max_tokens, (u, max_tokens)
        assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
        if reasons[0] == "length":
            assert u.completion_tokens == max_tokens
        assert content or u.completion_tokens == 1, (content, u)
    statuses = [s for s, _ in probe.results]
    slowest = max(t for _, t in probe.results)
    assert len(probe.results) >= max(3, elapsed / 0.2 / 3), (len(probe.results), elapsed)
    assert set(statuses) == {200}, statuses
    assert slowest < 1.0, f"/health took {slowest:.2f} s under load"
    samples = wait_metrics(bundled_server, lambda s: s["loupe_num_running_reqs"] == 0, timeout=10)
    assert samples["loupe_num_running_reqs"] == 0 and samples["loupe_kv_used_tokens"] == 0
    print(f"{CLIENTS} streams in {elapsed:.1f} s; {len(statuses)} /health probes, slowest {slowest * 1000:.0f} ms;",
          f"{read_metrics(bundled_server)['loupe_generation_tokens_total']:.0f} tokens generated so far")
