"""One mixed load on two servers that differ only in `--chunked-prefill-size` (512, the default,
and 64), compared by `loupe traces diff`: what smaller prefill chunks change for streams decoding
while long prompts arrive, and for those long prompts.

    .venv/bin/python benchmarks/bench_traces_diff.py [--rounds 6] [--out DIR]

Both servers run the bundled model with one matmul thread (on a machine others share, two
threads that wait for each other at every operation are the first slowed by a neighbour),
tracing at level 3 to a file each, side by side, started once; the rounds alternate between
them, the order swapped each round, so the machine's noise falls on both alike. A round:
STREAMS chat streams of STREAM_TOKENS tokens each; once every stream has a few tokens,
LONG_PROMPTS prompts of 1,093 tokens (3 chunks of 512, 18 of 64; each its own, no prefix cache
hits) are sent one after another to /v1/completions, for 2 tokens each. The servers are
stopped (their files then hold every span) and `loupe traces diff` on the two files is printed:
before is 512, after is 64.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for harness
from harness import LiveServer, running  # noqa: E402
from loupe.traces.commands import main as traces  # noqa: E402

CHUNKS = (512, 64)
STREAMS, STREAM_TOKENS = 3, 64
LONG_PROMPTS, LONG_WORDS = 2, 300  # a word of "word{i}" is about 3 tokens
TOKENS_BEFORE_LONG = 4  # each stream's tokens before the long prompts come


def round_of_load(server: LiveServer, model: str, round: int) -> None:
    decoding = threading.Barrier(STREAMS + 1, timeout=120)  # broken, not hung, if a stream fails

    def stream(i: int) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": f"Story {round}.{i}: once upon a time"}],
                "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True}
        with server.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for n, _ in enumerate(line for line in r.iter_lines() if line.startswith("data: ")):
                if n == TOKENS_BEFORE_LONG:
                    decoding.wait()

    with ThreadPoolExecutor(STREAMS) as pool, server.client() as http:
        streams = [pool.submit(stream, i) for i in range(STREAMS)]
        decoding.wait()
        for i in range(LONG_PROMPTS):
            prompt = f"{round}.{i} " + " ".join(f"word{w}" for w in range(LONG_WORDS))
            r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200, r.text
        for s in streams:
            s.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of load on each server (default: 6)")
    parser.add_argument("--out", help="folder for the trace files (default: a new temporary one)")
    args = parser.parse_args()
    folder = args.out or tempfile.mkdtemp(prefix="loupe-traces-diff-")
    paths = {size: os.path.join(folder, f"chunked-{size}.jsonl") for size in CHUNKS}
    servers = {size: LiveServer("--enable-tracing", "--otlp-endpoint", f"file://{paths[size]}",
                                "--chunked-prefill-size", size, log_dir=folder, env={"OMP_NUM_THREADS": "1"})
               for size in CHUNKS}
    with running(*servers.values()):
        model = servers[CHUNKS[0]].served_model()
        for r in range(args.rounds):
            for size in (CHUNKS if r % 2 == 0 else reversed(CHUNKS)):
                round_of_load(servers[size], model, r)
                print(f"round {r + 1}: --chunked-prefill-size {size} done", file=sys.stderr, flush=True)
    print(f"{args.rounds} rounds of {STREAMS} streams of {STREAM_TOKENS} tokens and {LONG_PROMPTS} prompts of "
          f"{LONG_WORDS} words on each server; files in {folder}\n")
    traces(["diff", paths[CHUNKS[0]], "--", paths[CHUNKS[1]]])


if __name__ == "__main__":
    main()
