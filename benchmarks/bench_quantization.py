"""int4 weights against the exact float32 path, on the bundled model in the offline engine.

Speed: output tok/s at each concurrency, both engines in one process, rounds alternating
which goes first; median tok/s and the median of the per-round ratios. Accuracy: greedy
agreement on the parity prompts (tokens before the first difference, of 32) and the largest
logit difference over a prompt's prefill and its first decode steps. Profile: where one
single-stream decode step's time goes, per op group, and what is left for Python (the step's
wall time minus the time inside ops).

    .venv/bin/python benchmarks/bench_quantization.py --concurrency 1 8 16 32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled; harness
from harness.reference_models import loupe_step_logits  # noqa: E402
from loupe import Engine  # noqa: E402

PARITY_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                  "Explain photosynthesis in one sentence.", "Who wrote Hamlet?",
                  "List three prime numbers.", "Translate 'good morning' into French."]
GREEDY = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
OP_GROUPS = {"int4 matmul": ("int4pack",), "float matmul": ("linear", "addmm", "mm"),
             "attention": ("scaled_dot_product", "flash_attention"), "norm": ("rms_norm", "pow", "mean", "rsqrt"),
             "index/copy": ("index", "copy", "cat", "to_copy", "empty", "put")}


def chat_ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)["input_ids"]


def speed(engines: dict[str, Engine], concurrency: int, rounds: int, tokens: int = 48) -> dict[str, list[float]]:
    prompts = [f"Tell me something about the number {i}." for i in range(concurrency)]
    params = [{"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}] * concurrency
    for engine in engines.values():
        engine.generate(prompts, params)  # warm-up
    result: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            started = time.perf_counter()
            engines[name].generate(prompts, params)
            result[name].append(tokens * concurrency / (time.perf_counter() - started))
    return result


def accuracy(exact: Engine, fast: Engine) -> None:
    worst, agreed = 0.0, []
    for text in PARITY_PROMPTS:
        ids = chat_ids(exact, text)
        a = exact.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        b = fast.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        agreed.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
        steps = zip(loupe_step_logits(exact.scheduler, ids, a[:8]), loupe_step_logits(fast.scheduler, ids, a[:8]),
                    strict=True)
        worst = max(worst, *((la[-1] - lb[-1]).abs().max().item() for la, lb in steps))
    print(f"greedy tokens before the first difference (of {GREEDY['max_new_tokens']}): {agreed}")
    print(f"largest logit difference, prefill and 8 decode steps of each prompt: {worst:.3f}")


def profile(engine: Engine, steps: int = 32) -> None:
    """Op self-times per group under the profiler; Python and the rest: a step's wall time
    measured without the profiler (which slows every op call) less the time inside ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    params = {"max_new_tokens": steps, "temperature": 0, "ignore_eos": True}
    walls = []
    for _ in range(3):
        started = time.perf_counter()
        engine.generate("Hello, my name is", params)
        walls.append((time.perf_counter() - started) * 1e3 / steps)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate("Hello, my name is", params)
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.lower()
        group = next((g for g, keys in OP_GROUPS.items() if any(k in name for k in keys)), "other ops")
        groups[group] += event.self_cpu_time_total / 1e3 / steps
    wall = statistics.median(walls)
    print(f"  {wall:.1f} ms a step: " + ", ".join(
        f"{g} {ms:.1f}" for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])) +
        f", Python and the rest {max(0.0, wall - sum(groups.values())):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    most = max(args.concurrency)
    engines = {"none": Engine(quantization="none", max_running_requests=most, disable_radix_cache=True),
               "int4": Engine(quantization="int4", max_running_requests=most, disable_radix_cache=True)}
    for c in args.concurrency:
        tps = speed(engines, c, args.rounds)
        ratios = [b / a for a, b in zip(tps["none"], tps["int4"], strict=True)]
        print(f"C={c}: none {statistics.median(tps['none']):.1f} tok/s, int4 {statistics.median(tps['int4']):.1f}; "
              f"int4/none median {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]", flush=True)
    accuracy(engines["none"], engines["int4"])
    for name, engine in engines.items():
        print(f"single-stream decode step, {name}:")
        profile(engine)


if __name__ == "__main__":
    main()
