"""loupe's offline engine at two revisions, side by side: did a change make it faster or slower?

    .venv/bin/python benchmarks/bench_ab.py --baseline HEAD~1 --concurrency 1 8 32 --rounds 5

The baseline revision is checked out into a temporary git worktree. Every round runs the same
requests (bench_engine.py's workload: 20-60 token prompts, 16-160 output tokens, ignore_eos,
radix cache off) through this tree's engine and the baseline's, each in a fresh process, the
order alternating between rounds. The figure is each round's ratio of output tok/s (this tree
/ baseline): neighbours in time share the machine's noise. Prints the median ratio and the
range per concurrency.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def child(tree: str, concurrency: int, seed: int) -> None:
    """In a fresh process: the engine of `tree` on the workload; prints {"tok_s": ...}."""
    sys.path.insert(0, tree)
    from loupe import Engine  # this tree's loupe: bench_engine below finds it already imported

    sys.path.append(str(HERE))
    from bench_engine import make_requests, run_loupe

    engine = Engine(dtype="float32", max_running_requests=concurrency, disable_radix_cache=True)
    reqs = make_requests(engine.tokenizer, max(2 * concurrency, 8), seed)
    engine.generate(input_ids=reqs[0].ids, sampling_params={"max_new_tokens": 8, "ignore_eos": True})  # warm-up
    tokens, seconds = run_loupe(engine, reqs)
    print(json.dumps({"tok_s": tokens / seconds, "loupe": os.path.dirname(sys.modules["loupe"].__file__)}))


def measure(tree: str, concurrency: int, seed: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", tree, "--concurrency", str(concurrency),
                          "--seed", str(seed)], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loupe"].startswith(tree), f"imported {result['loupe']}, not the tree {tree}"
    return result["tok_s"]


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
    ratios: dict[int, list[float]] = {c: [] for c in args.concurrency}
    try:
        for r in range(args.rounds):
            for c in args.concurrency:
                order = [str(REPO), base] if r % 2 == 0 else [base, str(REPO)]
                tok_s = {tree: measure(tree, c, args.seed) for tree in order}
                ratios[c].append(tok_s[str(REPO)] / tok_s[base])
                print(f"round {r + 1} C={c}: this {tok_s[str(REPO)]:.1f} tok/s, baseline {tok_s[base]:.1f} tok/s, "
                      f"ratio {ratios[c][-1]:.3f}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", base], check=False)
    print("\n  C  median ratio (this / baseline)  range")
    for c, values in ratios.items():
        print(f"{c:>3}  {statistics.median(values):>30.3f}  {min(values):.3f}-{max(values):.3f}")


if __name__ == "__main__":
    main()
