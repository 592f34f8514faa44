"""loupe's offline engine at two revisions, side by side: did a change make it faster or slower?

    .venv/bin/python benchmarks/bench_ab.py --baseline HEAD~1 --concurrency 1 8 32 --rounds 5

The baseline revision is checked out into a temporary git worktree. Every round runs the same
requests (bench_engine.py's workload: 20-60 token prompts, 16-160 output tokens, ignore_eos,
radix cache off) through this tree's engine and the baseline's, each in a fresh process, the
order alternating between rounds. The figures are each round's ratios (this tree / baseline)
of output tok/s and of the process's CPU time per output token: neighbours in time share
the machine's noise. Prints the median ratios and their ranges per concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def child(tree: str, concurrency: int, seed: int) -> None:
    """In a fresh process: the engine of `tree` on the workload; prints tok/s and CPU ms/token."""
    sys.path.insert(0, tree)
    from loupe import Engine  # this tree's loupe: bench_engine below finds it already imported

    sys.path.append(str(HERE))
    from bench_engine import make_requests, run_loupe

    engine = Engine(dtype="float32", max_running_requests=concurrency, disable_radix_cache=True)
    reqs = make_requests(engine.tokenizer, max(2 * concurrency, 8), seed)
    engine.generate(input_ids=reqs[0].ids, sampling_params={"max_new_tokens": 8, "ignore_eos": True})  # warm-up
    cpu = time.process_time()
    tokens, seconds = run_loupe(engine, reqs)
    cpu_ms = (time.process_time() - cpu) * 1000 / tokens
    print(json.dumps({"tok_s": tokens / seconds, "cpu_ms": cpu_ms, "loupe": os.path.dirname(sys.modules["loupe"].__file__)}))


def measure(tree: str, concurrency: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", tree, "--concurrency", str(concurrency),
                          "--seed", str(seed)], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loupe"].startswith(tree), f"imported {result['loupe']}, not the tree {tree}"
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with (default: HEAD)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.concurrency[0], args.seed)
    print(f"{cpu_model()}, {os.cpu_count()} cores; this tree {REPO} against {args.baseline}", flush=True)
    base = tempfile.mkdtemp(prefix="loupe-baseline-")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", base, args.baseline], check=True,
                   capture_output=True)
    ratios: dict[tuple[int, str], list[float]] = {(c, k): [] for c in args.concurrency for k in ("tok_s", "cpu_ms")}
    try:
        for r in range(args.rounds):
            for c in args.concurrency:
                order = [str(REPO), base] if r % 2 == 0 else [base, str(REPO)]
                this, baseline = (got := {tree: measure(tree, c, args.seed) for tree in order})[str(REPO)], got[base]
                for key in ("tok_s", "cpu_ms"):
                    ratios[c, key].append(this[key] / baseline[key])
                print(f"round {r + 1} C={c}: tok/s this {this['tok_s']:.1f}, baseline {baseline['tok_s']:.1f}; "
                      f"CPU ms/token this {this['cpu_ms']:.2f}, baseline {baseline['cpu_ms']:.2f}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", base], check=False)
    print("\n  C  tok/s this/baseline: median [range]   CPU ms/token this/baseline: median [range]")
    for c in args.concurrency:
        print(f"{c:>3}  " + "   ".join(f"{statistics.median(v):>17.3f} [{min(v):.3f}-{max(v):.3f}]"
                                       for v in (ratios[c, "tok_s"], ratios[c, "cpu_ms"])))


if __name__ == "__main__":
    main()
