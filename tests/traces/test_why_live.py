"""`loupe traces why` names causes made on purpose on a live bundled-model server writing its
spans to a file: a long prompt arriving amid short streams (interference, against the extra
step time measured from the spans directly), a burst beyond --max-running-requests (queued,
with the count ahead), a repeated prompt (reuse)."""

from __future__ import annotations

import re
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import LiveServer
from loupe.traces.reader import read_files
from loupe.traces.why import explain_all, pick

pytestmark = pytest.mark.slow  # it starts a server

MAX_RUNNING = 3
LONG_PROMPT = " ".join(f"word{i}" for i in range(600))  # about 1,800 tokens: 7 chunks of 256
REPEATED_PROMPT = " ".join(f"item {i}," for i in range(200))  # shares no prefix with the long one


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("why-live")
    path = folder / "traces.jsonl"
    rids: dict[str, list[str]] = {"short": [], "long": [], "burst": [], "repeat": []}
    with LiveServer("--enable-tracing", "--otlp-endpoint", f"file://{path}", "--chunked-prefill-size", 256,
                    "--max-running-requests", MAX_RUNNING, log_dir=str(folder),
                    env={"LOUPE_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "50"}) as server, server.client() as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        decoding = threading.Barrier(3)

        def short(i: int) -> None:
            body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": 40, "ignore_eos": True,
                    "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                rids["short"].append(r.headers["traceparent"].split("-")[1])
                for n, _ in enumerate(r.iter_lines()):
                    if n == 6:  # a few tokens in: both stream, and the long prompt may come
                        decoding.wait()

        streams = [threading.Thread(target=short, args=(i,)) for i in range(2)]
        for t in streams:
            t.start()
        decoding.wait()

        def post(key: str, prompt: str, max_tokens: int) -> None:
            r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                   "ignore_eos": True})
            assert r.status_code == 200, r.text
            rids[key].append(r.headers["traceparent"].split("-")[1])

        post("long", LONG_PROMPT, 2)
        for t in streams:
            t.join()
        with ThreadPoolExecutor(2 * MAX_RUNNING) as pool:
            list(pool.map(lambda i: post("burst", f"Burst {i}: the time went", 24), range(2 * MAX_RUNNING)))
        for _ in range(2):
            post("repeat", REPEATED_PROMPT, 2)
    traces = read_files([str(path)]).traces
    return {"traces": traces, "rids": rids}


def explain(run: dict, trace_id: str):
    (why,) = explain_all(run["traces"], pick(run["traces"], trace_id, 1, None))
    assert sum(c.e2e for c in why.causes) == pytest.approx(why.e2e)
    return why, {c.name: c for c in why.causes}


def direct_interference(spans: list, long_chunk_batches: set) -> float:
    """From the stream's own decode steps: those in a pass with the long prompt's chunk, less
    the median of its other steps."""
    steps = [s for s in spans if s.name == "decode_step"]
    shared = [s.seconds for s in steps if s.attributes["batch_id"] in long_chunk_batches]
    alone = [s.seconds for s in steps if s.attributes["batch_id"] not in long_chunk_batches]
    assert shared and alone
    return sum(shared) - len(shared) * statistics.median(alone)


def test_a_long_prompt_amid_short_streams_is_interference_of_the_right_size(run):
    (long_trace,) = run["rids"]["long"]
    long_spans = run["traces"][long_trace]
    long_rid = next(s for s in long_spans if s.is_request).attributes["rid"]
    chunk_batches = {s.attributes["batch_id"] for s in long_spans if s.name == "prefill_chunk"}
    assert len(chunk_batches) >= 5
    for trace_id in run["rids"]["short"]:
        why, causes = explain(run, trace_id)
        assert why.level == 3
        interference = causes["interference"]
        assert any(long_rid in line for line in interference.evidence), interference.evidence
        direct = direct_interference(run["traces"][trace_id], chunk_batches)
        assert interference.e2e == pytest.approx(direct, rel=0.25), (interference.e2e, direct)
        assert interference.e2e > causes["decode"].e2e / 4  # a cause of its size, not noise


def test_the_decode_stages_counts_agree_with_its_steps_and_tell_interference_at_level_2(run):
    """The counts a decode stage carries from level 2 are its step spans summed; the streams'
    traces without their step spans (as level 2 writes them) still show the interference."""
    chunk_batches = {s.attributes["batch_id"] for spans in run["traces"].values() for s in spans
                     if s.name == "prefill_chunk"}
    for trace_id in run["rids"]["short"]:
        spans = run["traces"][trace_id]
        (stage,) = [s for s in spans if s.name == "decode"]
        steps = [s for s in spans if s.name == "decode_step"]
        mixed = [s for s in steps if s.attributes["batch_id"] in chunk_batches]
        a = stage.attributes
        assert (a["steps"], a["mixed_steps"]) == (len(steps), len(mixed))
        assert a["step_seconds"] == pytest.approx(sum(s.seconds for s in steps), abs=1e-5)
        assert a["mixed_seconds"] == pytest.approx(sum(s.seconds for s in mixed), abs=1e-5)
        level_3 = explain(run, trace_id)[1]["interference"].e2e
        without_steps = {trace_id: [s for s in spans if s.name not in ("decode_step", "prefill_chunk")]}
        (level_2,) = explain_all(without_steps, pick(without_steps, trace_id, 1, None))
        assert level_2.level == 2
        assert level_2.cause("interference").e2e == pytest.approx(level_3, rel=0.25)


def test_a_burst_beyond_max_running_requests_is_queued_with_the_count_ahead(run):
    queued = {}  # requests ahead of it when it arrived (running and waiting): its queued seconds
    for trace_id in run["rids"]["burst"]:
        cause = explain(run, trace_id)[1]["queued"]
        counts = [re.search(r"(\d+) running and (\d+) waiting ahead", line) for line in cause.evidence]
        (found,) = [m for m in counts if m]
        queued[trace_id] = (int(found[1]) + int(found[2]), cause.e2e)
    behind = [seconds for ahead, seconds in queued.values() if ahead >= MAX_RUNNING]
    served = [seconds for ahead, seconds in queued.values() if ahead < MAX_RUNNING]
    assert len(behind) >= MAX_RUNNING - 1 and served, queued  # some came when every slot was taken
    assert min(behind) > max(served), queued  # they waited for a slot; the others did not


def test_a_repeated_prompt_reuses_the_prefix_cache(run):
    first, second = (explain(run, t)[1]["own prefill"] for t in run["rids"]["repeat"])
    reused = re.search(r"(\d+) reused from the prefix cache", second.evidence[0])
    assert reused and int(reused[1]) >= 128, second.evidence  # all but the prompt's last, partial page
    assert second.e2e < first.e2e / 2

