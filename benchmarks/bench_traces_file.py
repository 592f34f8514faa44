"""How long `loupe traces why | summary | show` take on a large trace file, and their peak memory.

1. Record: the bundled model at trace level 3 writing OTLP JSON lines to a file under mixed
   load for `--seconds`: streams of short prompts (`loupe bench`'s) and, beside them, long
   prompts prefilled in chunks, so the file holds interference, queueing and long contexts.
2. Grow: copies of that file one after the other up to `--size-gb`, each with fresh trace,
   span and request ids, its times shifted past the copy before and its batch ids too: one
   scheduler's passes as one long run would have written them (`why`'s `Passes` keys a pass
   by scheduler and batch id, so copies with the same ids would merge into wrong passes).
3. Time each command in a fresh process (`python -m loupe.cli traces …`), `--runs` times:
   seconds (median and all), CPU seconds (median) and the process's peak RSS; with `--trees`,
   in each of several checkouts in turn (this one against an older revision, side by side).

    .venv/bin/python benchmarks/bench_traces_file.py --record /tmp/traces-seed.jsonl --seconds 120
    .venv/bin/python benchmarks/bench_traces_file.py --grow /tmp/traces-seed.jsonl --size-gb 1 \
        --output /tmp/traces-1g.jsonl
    .venv/bin/python benchmarks/bench_traces_file.py --time /tmp/traces-1g.jsonl [--runs 3]
    git worktree add /tmp/loupe-before HEAD~3     # or any older revision, then both side by side:
    .venv/bin/python benchmarks/bench_traces_file.py --time /tmp/traces-1g.jsonl --trees /tmp/loupe-before .
    .venv/bin/python benchmarks/bench_traces_file.py --profile why /tmp/traces-1g.jsonl   # cProfile, top 25
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for harness
from harness import LiveServer  # noqa: E402
from loupe.bench import run as run_load  # noqa: E402


def record(path: str, seconds: float) -> None:
    """A level-3 server's spans under mixed load for `seconds`, written to `path`: rounds of 16
    short streams (16-160 tokens each) with two long prompts (~1,000-2,000 tokens, prefilled in
    256-token chunks) beside them."""
    folder = os.path.dirname(os.path.abspath(path))
    env = {"LOUPE_OTLP_FILE_MAX_MB": "0"}  # one file, however long the run
    with LiveServer("--enable-tracing", "--otlp-endpoint", f"file://{os.path.abspath(path)}",
                    "--chunked-prefill-size", 256, log_dir=folder, env=env) as server:
        model = server.served_model()

        async def load() -> None:
            deadline, seed = time.monotonic() + seconds, 0
            while time.monotonic() < deadline:
                short = run_load(server.base_url, model, 16, 32, seed, None)
                long = run_load(server.base_url, model, 2, 2, 1000 + seed, None, 8, words=(1000, 2000))
                for name, result in zip(("short", "long"), await asyncio.gather(short, long), strict=True):
                    print(f"round {seed} {name}: {result['requests']} requests, {result['failed']} failed, "
                          f"e2e p50 {result['e2e_p50_s']} s", flush=True)
                seed += 1

        asyncio.run(load())
        time.sleep(2)  # the exporter's last lines
    print(f"wrote {path}: {os.path.getsize(path) / 2**20:.1f} MiB")


class Copy:
    """What changes in the `n`th copy of a recorded file: ids XORed with this copy's random bits
    (the same id the same everywhere, copies apart), times and batch ids shifted past those
    of the copies before."""

    def __init__(self, n: int, nanoseconds: int, batches: int):
        bits = random.Random(n).getrandbits(128)
        self.n, self.trace_bits, self.span_bits = n, bits, bits & (2**64 - 1)
        self.shift, self.batch_shift = n * nanoseconds, n * batches

    def id(self, hex_id: str, bits: int) -> str:
        return f"{int(hex_id, 16) ^ bits:0{len(hex_id)}x}" if hex_id else hex_id

    def time(self, nanoseconds: str | int) -> str:
        return str(int(nanoseconds) + self.shift)

    def rid(self, rid: str) -> str:
        return f"{rid}-{self.n}"

    def attributes(self, pairs: list[dict]) -> None:
        for kv in pairs:
            if kv["key"] == "batch_id":
                kv["value"] = {"intValue": str(int(kv["value"]["intValue"]) + self.batch_shift)}
            elif kv["key"] in RID_ATTRIBUTES:
                kv["value"] = {"stringValue": self.rid(kv["value"]["stringValue"])}

    def span(self, s: dict) -> None:
        s["traceId"] = self.id(s["traceId"], self.trace_bits)
        for key in ("spanId", "parentSpanId"):
            if key in s:
                s[key] = self.id(s[key], self.span_bits)
        s["startTimeUnixNano"], s["endTimeUnixNano"] = self.time(s["startTimeUnixNano"]), self.time(s["endTimeUnixNano"])
        if s["name"].startswith("Req "):
            s["name"] = "Req " + self.rid(s["name"][4:])
        self.attributes(s.get("attributes", []))
        for event in s.get("events", ()):
            event["timeUnixNano"] = self.time(event["timeUnixNano"])
            self.attributes(event.get("attributes", []))


RID_ATTRIBUTES = ("rid", "gen_ai.request.id", "gen_ai.response.id")


def spans_in(export: dict) -> list[dict]:
    return [s for rs in export["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]


def grow(seed: str, output: str, size: int) -> dict:
    """Copies of the `seed` file, one after the other, to `size` bytes (the last one whole)."""
    with open(seed) as f:
        lines = [line for line in f if line.strip()]
    spans = [s for line in lines for s in spans_in(json.loads(line))]
    first = min(int(s["startTimeUnixNano"]) for s in spans)
    last = max(int(s["endTimeUnixNano"]) for s in spans)
    batches = 1 + max((int(kv["value"]["intValue"]) for s in spans for item in (s, *s.get("events", ()))
                       for kv in item.get("attributes", ()) if kv["key"] == "batch_id"), default=0)
    written = copies = 0
    with open(output, "w") as f:
        while written < size:
            copy = Copy(copies, last - first + 10**9, batches)  # a second apart
            for line in lines:
                export = json.loads(line)
                for s in spans_in(export):
                    copy.span(s)
                text = json.dumps(export, separators=(",", ":"), ensure_ascii=False) + "\n"
                f.write(text)
                written += len(text.encode())
            copies += 1
    requests = sum(s["name"].startswith("Req ") for s in spans)
    return {"bytes": os.path.getsize(output), "copies": copies, "spans": copies * len(spans),
            "requests": copies * requests}


def first_trace(path: str) -> str:
    """The trace id of the first request's root in the file (what `show` is timed on)."""
    with open(path) as f:
        for line in f:
            root = next((s for s in spans_in(json.loads(line)) if s["name"].startswith("Req ")), None)
            if root is not None:
                return root["traceId"]
    raise SystemExit(f"no request in {path}")


def commands(path: str) -> dict[str, list[str]]:
    return {"why --slowest 5": ["why", "--slowest", "5", path], "summary": ["summary", path],
            "show": ["show", first_trace(path), path]}


def timed(args: list[str], tree: str) -> tuple[float, float, float]:
    """Seconds, CPU seconds and peak RSS (MiB) of `loupe traces ARGS` in a fresh process run in
    `tree` (a loupe checkout), its output to a pipe."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "loupe.cli", "traces", *args], stdout=subprocess.DEVNULL,
                               cwd=tree)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"loupe traces {' '.join(args)}: exit {process.returncode}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def time_commands(path: str, runs: int, trees: list[str]) -> None:
    """Each command `runs` times in each tree, the trees taking turns: medians of seconds and of
    CPU seconds (the steadier on a shared machine), the largest peak RSS."""
    print(f"{path}: {os.path.getsize(path) / 2**30:.2f} GiB")
    for name, args in commands(path).items():
        figures: dict[str, list[tuple[float, float, float]]] = {tree: [] for tree in trees}
        for _ in range(runs):
            for tree in trees:
                figures[tree].append(timed(args, tree))
        for tree, rows in figures.items():
            seconds, cpu, rss = zip(*rows, strict=True)
            print(f"{name:>16}: {statistics.median(seconds):6.1f} s ({', '.join(f'{s:.1f}' for s in seconds)}), "
                  f"CPU {statistics.median(cpu):6.1f} s, peak RSS {max(rss):,.0f} MiB  {tree}", flush=True)


def profile(path: str, command: str, top: int = 25) -> None:
    """cProfile of one command in this process: the functions that took the most time, with callees."""
    from loupe.cli import main

    args = next(args for name, args in commands(path).items() if name.split()[0] == command)
    profiler = cProfile.Profile()
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            profiler.runcall(main, ["traces", *args])
        finally:
            sys.stdout = stdout
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", metavar="PATH", help="record a level-3 server's spans under load to PATH")
    parser.add_argument("--seconds", type=float, default=120, help="how long --record loads the server")
    parser.add_argument("--grow", metavar="SEED", help="copies of SEED (a recorded file) into --output")
    parser.add_argument("--size-gb", type=float, default=1.0, help="the size --grow writes (GiB)")
    parser.add_argument("--output", default="traces-1g.jsonl", help="the file --grow writes")
    parser.add_argument("--time", metavar="PATH", help="time why, summary and show on PATH")
    parser.add_argument("--runs", type=int, default=3, help="runs of each command (the median is shown)")
    parser.add_argument("--trees", nargs="+", default=[REPO], metavar="DIR",
                        help="loupe checkouts to time side by side, e.g. an older revision's (default: this one)")
    parser.add_argument("--profile", nargs=2, metavar=("COMMAND", "PATH"), help="cProfile why, summary or show")
    args = parser.parse_args()
    if args.record:
        record(args.record, args.seconds)
    if args.grow:
        start = time.perf_counter()
        grown = grow(args.grow, args.output, int(args.size_gb * 2**30))
        print(f"wrote {args.output} in {time.perf_counter() - start:.0f} s: {grown['bytes'] / 2**30:.2f} GiB, "
              f"{grown['copies']} copies, {grown['spans']:,} spans, {grown['requests']:,} requests")
    if args.time:
        time_commands(args.time, args.runs, args.trees)
    if args.profile:
        profile(args.profile[1], args.profile[0])
    if not (args.record or args.grow or args.time or args.profile):
        parser.print_usage()


if __name__ == "__main__":
    main()
