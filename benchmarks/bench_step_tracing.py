"""What the scheduler's tracer adds to each forward pass, at two revisions: did a change to the
spans make serving slower?

    .venv/bin/python benchmarks/bench_step_tracing.py --baseline 27a1749^ --rounds 7

`SchedulerTracer.forward` is the tracer's only work on every pass (the spans of a pass's
requests, at levels 2 and 3). Each round times it, in a fresh process for this tree and one
for the baseline (a temporary git worktree), the order alternating, on passes of 32
requests: all decoding at level 3 and at level 2, and 28 decoding beside 4 prefill chunks
at level 3. The recorder's socket is never flushed (sending is the exporter's work, in its
own process). Prints each case's median ns per pass for both trees and the extra.

Then the share of serving time: the bundled model runs 64 requests (bench_engine.py's
workload) 32 at a time with tracing off, counting its forward passes; the extra ns per pass
times the passes, over the run's wall time, is what the change would cost in throughput if
every pass were traced at that level.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BATCH = 32
CASES = {"decode x32, level 3": (3, 32), "decode x32, level 2": (2, 32), "decode x28 + 4 chunks, level 3": (3, 28)}


class FakeReq:
    """What SchedulerTracer.forward reads of a request."""

    def __init__(self, spans, decoding: bool, i: int):
        self.spans, self.bootstrap = spans, None
        self.kv_len = 300 + i
        self.seq_len = self.kv_len + (1 if decoding else 64)
        self.output_ids = list(range(20)) if decoding else []


def forward_ns(level: int, num_decoding: int, passes: int = 20_000) -> float:
    """ns per SchedulerTracer.forward call of the loupe first on sys.path."""
    from loupe.core import TraceContext
    from loupe.tracing.recorder import Recorder
    from loupe.tracing.spans import SchedulerSpans, SchedulerTracer

    tracer = SchedulerTracer(Recorder("ipc:///tmp/loupe-bench-unused", "Scheduler"))
    tracer.recorder.maybe_flush = lambda: None  # never sends: only the pass's own work
    batch = []
    for i in range(BATCH):
        spans = SchedulerSpans(TraceContext(i + 1, i + 1000, level), time.perf_counter_ns())
        spans.stage = "decode" if i < num_decoding else "prefill"
        batch.append(FakeReq(spans, i < num_decoding, i))
    num_new = [1] * num_decoding + [64] * (BATCH - num_decoding)
    best = []
    for _ in range(3):
        start = time.perf_counter_ns()
        for batch_id in range(passes):
            tracer.forward(batch, num_new, start, start + 1000, batch_id, num_decoding)
            tracer.recorder.spans.clear()
            tracer.recorder.fanouts.clear()
            for req in batch:
                req.spans.events.clear()
        best.append((time.perf_counter_ns() - start) / passes)
    return min(best)


def child(tree: str) -> None:
    sys.path.insert(0, tree)
    result = {name: forward_ns(level, num_decoding) for name, (level, num_decoding) in CASES.items()}
    import loupe

    print(json.dumps({"ns": result, "loupe": os.path.dirname(loupe.__file__)}))


def measure(tree: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", tree], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loupe"].startswith(tree), f"imported {result['loupe']}, not the tree {tree}"
    return result["ns"]


def serving_passes() -> tuple[int, float]:
    """Forward passes and wall seconds of the bundled model on 64 requests, 32 at a time."""
    sys.path.insert(0, str(REPO))
    sys.path.append(str(HERE))
    from bench_engine import make_requests, run_loupe

    from loupe import Engine

    engine = Engine(dtype="float32", max_running_requests=BATCH, disable_radix_cache=True)
    passes = [0]
    forward = engine.worker.forward

    def counted(*args, **kwargs):
        passes[0] += 1
        return forward(*args, **kwargs)

    engine.worker.forward = counted
    reqs = make_requests(engine.tokenizer, 2 * BATCH, 0)
    engine.generate(input_ids=reqs[0].ids, sampling_params={"max_new_tokens": 8, "ignore_eos": True})  # warm-up
    passes[0] = 0
    _, seconds = run_loupe(engine, reqs)
    return passes[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with (default: HEAD)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory() as folder:
        baseline = os.path.join(folder, "baseline")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", baseline, args.baseline],
                       check=True, capture_output=True)
        try:
            runs: dict[str, list[dict[str, float]]] = {"this tree": [], "baseline": []}
            for i in range(args.rounds):
                order = [("this tree", str(REPO)), ("baseline", baseline)]
                for name, tree in order if i % 2 == 0 else order[::-1]:
                    runs[name].append(measure(tree))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", baseline], check=True)
    passes, seconds = serving_passes()
    print(f"baseline {args.baseline}, {args.rounds} rounds; serving: {passes} passes in {seconds:.2f} s "
          f"({seconds / passes * 1000:.1f} ms a pass) for 64 requests {BATCH} at a time, tracing off")
    print(f"{'case':34} {'baseline ns':>12} {'this tree ns':>13} {'extra ns':>9} {'share of serving':>17}")
    for case in CASES:
        before = statistics.median(r[case] for r in runs["baseline"])
        after = statistics.median(r[case] for r in runs["this tree"])
        share = (after - before) * passes / (seconds * 1e9)
        print(f"{case:34} {before:12.0f} {after:13.0f} {after - before:9.0f} {share:17.4%}")


if __name__ == "__main__":
    main()
