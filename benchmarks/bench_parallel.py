"""Throughput of tensor, pipeline and data parallelism on this machine, side by side.

SmolLM2-135M has 9 attention heads, which 2 ranks cannot split, so the TP-2 comparison runs
on a random-weight model of SmolLM2's size and shape but 8 heads of 72 (4 KV heads): tp1,
tp2, pp2 and dp2 servers on it. SmolLM2 itself runs as tp1 and tp3 (3 divides its heads).
Every server is up at once (idle ones cost nothing); rounds alternate their order; medians.

    .venv/bin/python benchmarks/bench_parallel.py [--rounds 2] [--concurrency 32] [--num-requests 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for harness
from harness import LiveServer, running  # noqa: E402
from loupe.bench import run as run_load  # noqa: E402

CONFIGS = {  # name: (model, flags); the first of each model is its baseline
    "8-head tp1": ("random", []),
    "8-head tp2": ("random", ["--tp-size", "2"]),
    "8-head pp2": ("random", ["--pp-size", "2"]),
    "8-head dp2": ("random", ["--dp-size", "2"]),
    "SmolLM2 tp1": ("bundled", []),
    "SmolLM2 tp3": ("bundled", ["--tp-size", "3"]),
}


def write_random_model(folder: str) -> str:
    """SmolLM2-135M's shape with 8 heads of 72 and 4 KV heads, random weights, its tokenizer."""
    import torch
    import transformers

    from loupe.model.gguf_loader import bundled_model_path, load_gguf_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
        num_key_value_heads=4, head_dim=72, max_position_embeddings=2048, tie_word_embeddings=True,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    load_gguf_tokenizer(bundled_model_path()).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=64)
    args = parser.parse_args()
    folder = write_random_model(tempfile.mkdtemp(prefix="loupe-bench-8head-"))
    servers = {name: LiveServer(*(["--model-path", folder] if model == "random" else []), *flags, port=31200 + i,
                                compile=True, ready_timeout=600)  # as served by default
               for i, (name, (model, flags)) in enumerate(CONFIGS.items())}
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with running(*servers.values()):
        models = {name: server.served_model() for name, server in servers.items()}
        for name, server in servers.items():
            asyncio.run(run_load(server.base_url, models[name], 4, 4, 99, None))  # warm up
        for r in range(args.rounds):
            for name in (list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))):
                summary = asyncio.run(run_load(servers[name].base_url, models[name],
                                               args.concurrency, args.num_requests, r, None))
                assert summary["failed"] == 0, summary
                results[name].append(summary["output_tokens_per_s"])
                print(f"round {r + 1} {name:>12}: {summary['output_tokens_per_s']:7.1f} tok/s", file=sys.stderr)
    print(f"\nconcurrency {args.concurrency}, {args.num_requests} requests per run, {args.rounds} rounds, medians")
    print(f"{'config':>12} {'tok/s':>8} {'vs tp1':>8}")
    baseline = {}
    for name, (model, _) in CONFIGS.items():
        tps = statistics.median(results[name])
        baseline.setdefault(model, tps)
        print(f"{name:>12} {tps:8.1f} {tps / baseline[model]:8.3f}")


if __name__ == "__main__":
    main()
