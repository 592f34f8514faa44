"""Offline throughput benchmark: loupe (continuous batching) vs transformers (static batches).

Each request has a plain-text prompt of 20-60 tokens and its own max_new_tokens drawn from
16-160 (fixed seed, ignore_eos so lengths are exact). At concurrency C, loupe runs with
max_running_requests=C and gets every request in one generate call; transformers runs static,
left-padded batches of C requests in submission order, each generating the batch's longest
length, and is credited only with the tokens each request asked for. Also reports achieved
GFLOPS for loupe as a share of a square-matmul peak measured in the same process.

    .venv/bin/python benchmarks/bench_engine.py --concurrency 1 8 32 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
from loupe import Engine  # noqa: E402
from loupe.model.loader import read_checkpoint  # noqa: E402

SENTENCES = [
    "The old lighthouse keeper climbed the stairs every evening at dusk.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "Write a short poem about a cat who is afraid of the rain.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them.",
    "Explain why the sky looks blue during the day and red at sunset.",
    "A good sourdough starter needs flour, water, warmth and patience.",
    "The train to the coast was delayed by a fallen tree across the tracks.",
    "List three ways to make a small apartment feel more spacious.",
    "Binary search halves the remaining interval at every step.",
    "She opened the letter slowly, afraid of what it might say.",
    "Summarise the rules of chess for someone who has never played.",
    "Glaciers carve wide U-shaped valleys as they move downhill.",
    "The market sold lemons, olives, fresh bread and hand-made soap.",
    "Describe a city in the year 2200 in a few sentences.",
    "Compound interest grows savings faster the earlier you start.",
    "The orchestra tuned up while the audience found their seats.",
    "What are the main differences between a virus and a bacterium?",
    "Honeybees communicate the direction of flowers with a waggle dance.",
    "He fixed the bicycle chain with a pair of pliers and some oil.",
    "Translate the phrase 'good morning, my friend' into French and Spanish.",
]


@dataclass
class Request:
    ids: list[int]
    max_new_tokens: int


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_requests(tokenizer, n: int, seed: int) -> list[Request]:
    """n plain-text prompts of 20-60 tokens (random sentence mixes) with 16-160 output tokens."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        target = rng.randint(20, 60)
        ids: list[int] = []
        while len(ids) < target:
            ids += tokenizer.encode(" ".join(rng.sample(SENTENCES, 3)) + " ")
        reqs.append(Request(ids[:target], rng.randint(16, 160)))
    return reqs


def build_hf_model(hf_config: dict, state_dict: dict[str, torch.Tensor]) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "architectures"})
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.generation_config.eos_token_id = None  # never stop early: same work as ignore_eos
    model.generation_config.pad_token_id = hf_config.get("pad_token_id", 0)
    return model.eval().requires_grad_(False)


def run_loupe(engine: Engine, reqs: list[Request]) -> tuple[int, float]:
    params = [{"max_new_tokens": r.max_new_tokens, "temperature": 0, "ignore_eos": True} for r in reqs]
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=[r.ids for r in reqs], sampling_params=params)
    elapsed = time.perf_counter() - t0
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    assert tokens == sum(r.max_new_tokens for r in reqs), "loupe did not produce the exact lengths"
    return tokens, elapsed


def hf_generate(model, tokenizer, batch: list[list[int]], max_new_tokens: int) -> torch.Tensor:
    enc = tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
    return out[:, enc["input_ids"].shape[1]:]


def run_hf(model, tokenizer, reqs: list[Request], concurrency: int) -> tuple[int, float]:
    """Static batches in submission order; count only each request's own max_new_tokens."""
    t0 = time.perf_counter()
    for i in range(0, len(reqs), concurrency):
        batch = reqs[i:i + concurrency]
        longest = max(r.max_new_tokens for r in batch)
        out = hf_generate(model, tokenizer, [r.ids for r in batch], longest)
        assert out.shape[1] == longest, "transformers stopped early"
    return sum(r.max_new_tokens for r in reqs), time.perf_counter() - t0


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Best-of-loop GFLOPS of an n x n x n matmul (2*n^3 FLOPs each)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_request(p: int, n: int, dims: dict[str, int]) -> float:
    """Approximate FLOPs to serve one request with a p-token prompt and n output tokens.

    Every forwarded position (p prompt + n-1 generated; the last output token is never fed back)
    costs 2 * body_params FLOPs (one multiply-add per weight of the non-embedding matmuls); the
    n positions whose logits are sampled add 2 * lm_head_params. Attention adds QK^T and AV:
    4 * layers * heads * head_dim FLOPs per (query, key) pair, and position j attends to j keys.
    """
    positions = p + n - 1
    attention = 4 * dims["layers"] * dims["heads"] * dims["head_dim"] * positions * (positions + 1) / 2
    return 2 * dims["body_params"] * positions + 2 * dims["head_params"] * n + attention


def model_dims(hf_config: dict, state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    embed = state_dict["model.embed_tokens.weight"].numel()
    body = sum(v.numel() for k, v in state_dict.items() if k not in ("model.embed_tokens.weight", "lm_head.weight"))
    head = state_dict["lm_head.weight"].numel() if "lm_head.weight" in state_dict else embed  # tied
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    return {"body_params": body, "head_params": head, "layers": hf_config["num_hidden_layers"],
            "heads": heads, "head_dim": head_dim}


def sanity_check(engine: Engine, model, tokenizer, req: Request, n: int = 32) -> str:
    """Greedy output of loupe and transformers (float32) on one prompt must be identical."""
    ours = engine.generate(input_ids=req.ids, sampling_params={"max_new_tokens": n, "temperature": 0,
                                                               "ignore_eos": True})["output_ids"]
    theirs = hf_generate(model, tokenizer, [req.ids], n)[0].tolist()
    if ours == theirs:
        return f"greedy sanity check: loupe == transformers on {n} tokens (float32): MATCH"
    first = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    return f"greedy sanity check: MISMATCH at token {first}: loupe {ours[first:first+5]} vs hf {theirs[first:first+5]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests in flight")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="requests per concurrency level (default: max(2*concurrency, 8))")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and output lengths")
    parser.add_argument("--model-path", default=None, help="checkpoint (default: bundled SmolLM2-135M GGUF)")
    parser.add_argument("--quantization", default="none", choices=["none", "int4", "auto"],
                        help="loupe's weights (default none: the same float weights transformers runs)")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    load_before = os.getloadavg()[0]
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measuring matmul peak")
    peaks = {d: matmul_peak_gflops(getattr(torch, d)) for d in args.dtypes}
    # A throwaway engine gives the checkpoint path and tokenizer; also used for the sanity check.
    engine = Engine(model_path=args.model_path, dtype="float32", max_running_requests=1, disable_radix_cache=True,
                    quantization=args.quantization)
    tokenizer = engine.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_config, state_dict, _ = read_checkpoint(engine.worker.model.path)
    dims = model_dims(hf_config, state_dict)
    counts = {c: args.num_prompts or max(2 * c, 8) for c in args.concurrency}
    all_reqs = make_requests(tokenizer, max(counts.values()), args.seed)
    warm = make_requests(tokenizer, 1, args.seed + 1)[0]

    hf_fp32 = build_hf_model(hf_config, state_dict)
    sanity = sanity_check(engine, hf_fp32, tokenizer, warm)
    log(sanity)
    del engine

    rows, loupe_tps = [], {}
    for dtype in args.dtypes:
        hf = hf_fp32 if dtype == "float32" else build_hf_model(hf_config, state_dict).to(getattr(torch, dtype))
        hf_generate(hf, tokenizer, [warm.ids], 8)  # warm-up
        for c in args.concurrency:
            reqs = all_reqs[:counts[c]]
            # Radix cache off: measure batching, not prefix reuse (transformers has none here).
            engine = Engine(model_path=args.model_path, dtype=dtype, max_running_requests=c,
                            disable_radix_cache=True, quantization=args.quantization)
            engine.generate(input_ids=warm.ids, sampling_params={"max_new_tokens": 8, "ignore_eos": True})
            log(f"{dtype} C={c}: loupe, {len(reqs)} requests")
            tokens, t_loupe = run_loupe(engine, reqs)
            del engine
            log(f"{dtype} C={c}: loupe {tokens / t_loupe:.1f} tok/s in {t_loupe:.1f}s; transformers")
            _, t_hf = run_hf(hf, tokenizer, reqs, c)
            log(f"{dtype} C={c}: transformers {tokens / t_hf:.1f} tok/s in {t_hf:.1f}s")
            gflops = sum(flops_per_request(len(r.ids), r.max_new_tokens, dims) for r in reqs) / t_loupe / 1e9
            loupe_tps[dtype, c] = tokens / t_loupe
            rows.append((c, dtype, len(reqs), tokens, tokens / t_loupe, tokens / t_hf, t_hf / t_loupe,
                         gflops, 100 * gflops / peaks[dtype]))

    print(f"\nmodel: {hf_config.get('model_type')} {sum(dims[k] for k in ('body_params', 'head_params')) / 1e6:.1f}M "
          f"matmul params; torch threads: {torch.get_num_threads()}; 1-min load average "
          f"{load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end (others' load skews timings)")
    print("matmul peak (2048^3): " + ", ".join(f"{d} {g:.1f} GFLOPS" for d, g in peaks.items()))
    print(sanity)
    header = ("conc", "dtype", "reqs", "out_tok", "loupe tok/s", "hf tok/s", "loupe/hf", "loupe GFLOPS", "% peak")
    print("\n" + "  ".join(f"{h:>12}" for h in header))
    for c, dtype, n, tokens, tps, hf_tps, ratio, gflops, pct in rows:
        print("  ".join(f"{v:>12}" for v in (c, dtype, n, tokens, f"{tps:.1f}", f"{hf_tps:.1f}",
                                               f"{ratio:.2f}x", f"{gflops:.1f}", f"{pct:.1f}%")))
    if "bfloat16" in args.dtypes and "float32" in args.dtypes:
        print()
        for c in args.concurrency:
            print(f"loupe bf16/fp32 speed at C={c}: {loupe_tps['bfloat16', c] / loupe_tps['float32', c]:.2f}x")
    log(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
