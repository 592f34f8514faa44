"""`loupe traces diff` on a live bundled-model server: the same requests sent one after another
and in bursts, to a server that runs one request at a time (`--max-running-requests 1`).

Why this pair: the setting that differs is the client's concurrency, and in a burst each
request waits for those before it, so queued grows by hundreds of ms against a few ms of noise:
diff must flag it, and TTFT with it. Each request's forward passes are its own in both runs
(one running at a time, no prefix cache): nothing shares a step, so there is no interference,
and own prefill and decode do the same work. Against the default --max-running-requests the
burst would be batched, changing every step's time. One server, started once, serves both runs
in alternating rounds (who goes first swapped each round), so a loaded machine slows both alike
and the test pays for one start.

Only own prefill and decode are asserted unchanged. HTTP and tokenization is not: a burst's
later arrivals are handled while the first request runs, real contention on two cores that diff
rightly flags now and then; nor is between steps, which a scheduler with requests waiting runs
tighter. And each row is a 95% test, so even an unchanged row is flagged now and then by chance,
or by a neighbour's load falling on one run's rounds more than the other's: the test allows own
prefill and decode a flag, but only for a change small against queued's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import LiveServer
from loupe.traces.diff import Run, compare_runs
from loupe.traces.reader import read_files

pytestmark = pytest.mark.slow  # it starts a server

ROUNDS, BURST = 4, 5  # 20 requests a run


@pytest.fixture(scope="module")
def diffed(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("diff-live")
    path = folder / "traces.jsonl"
    runs: dict[str, list[str]] = {"one after another": [], "bursts": []}  # trace ids
    with LiveServer("--enable-tracing", "--otlp-endpoint", f"file://{path}", "--max-running-requests", 1,
                    "--disable-radix-cache", log_dir=str(folder),
                    env={"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "50"}) as server, server.client() as http:
        model = http.get("/v1/models").json()["data"][0]["id"]

        def post(run: str, i: int) -> None:
            r = http.post("/v1/completions", json={"model": model, "prompt": f"Request {i}: the time went",
                                                   "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200, r.text
            runs[run].append(r.headers["traceparent"].split("-")[1])

        with ThreadPoolExecutor(BURST) as pool:
            for round in range(ROUNDS):
                for run in sorted(runs, reverse=round % 2 == 1):  # who goes first alternates
                    if run == "bursts":
                        list(pool.map(lambda i: post("bursts", i), range(BURST)))
                    else:
                        for i in range(BURST):
                            post(run, i)
    traces = read_files([str(path)]).traces
    before, after = (Run.read({t: traces[t] for t in trace_ids}) for trace_ids in runs.values())
    return compare_runs(before, after)


def rows(result: dict, cause: str | None, metric: str = "e2e") -> dict[str, dict]:
    return {r["quantile"]: r for r in result["overall"]["rows"] if r["cause"] == cause and r["metric"] == metric}


def test_bursts_are_flagged_as_queued_and_not_as_prefill_or_decode(diffed):
    assert diffed["overall"]["before"] == diffed["overall"]["after"] == {"requests": ROUNDS * BURST, "errors": 0}
    for metric in ("e2e", "ttft"):
        queued = rows(diffed, "queued", metric)
        assert queued["p50"]["flagged"] and queued["p90"]["flagged"] and queued["p50"]["change"] > 0.05, queued
    assert rows(diffed, None, "ttft")["p50"]["flagged"]
    queued = rows(diffed, "queued")["p50"]["change"]
    for cause in ("own prefill", "decode"):
        p50 = rows(diffed, cause)["p50"]
        assert not p50["flagged"] or abs(p50["change"]) < queued / 10, p50
    assert "interference" not in {r["cause"] for r in diffed["overall"]["rows"]}  # neither run has any
