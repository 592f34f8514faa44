"""Run one Engine per tensor/pipeline-parallel rank in spawned processes (gloo on loopback)."""

from __future__ import annotations

import multiprocessing as mp

RANK_TIMEOUT = 180


def _run_rank(ranks, address: str, model_dir: str, prompts: list[str], params, results, logprobs: bool) -> None:
    import torch

    from loupe import Engine
    from loupe.distributed.parallel import Comm

    torch.set_num_threads(1)
    try:
        comm = Comm(ranks, address)
        engine = Engine(model_dir, comm=comm, dtype="float32", max_total_tokens=4096,
                        tp_size=ranks.tp_size, pp_size=ranks.pp_size)
        outputs = engine.generate(prompts, params, return_logprob=logprobs)
        results.put((ranks.world_rank, [o["meta_info"]["output_token_logprobs"] if logprobs else o["output_ids"]
                                        for o in outputs]))
        comm.close()
    except Exception as e:  # reported, not lost in a child's stderr
        results.put((ranks.world_rank, f"{type(e).__name__}: {e}"))


def generate_on_ranks(model_dir: str, tp_size: int, pp_size: int, prompts: list[str], params,
                      logprobs: bool = False) -> dict:
    """{world rank: output ids of each prompt (or an error string)} from every rank; with
    `logprobs`, each prompt's `output_token_logprobs` instead."""
    from loupe.distributed.parallel import Ranks, free_address

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    address = free_address()
    procs = [ctx.Process(target=_run_rank, args=(Ranks.of_world_rank(w, tp_size, pp_size), address, model_dir,
                                                 prompts, params, results, logprobs))
             for w in range(tp_size * pp_size)]
    for p in procs:
        p.start()
    try:
        return dict(results.get(timeout=RANK_TIMEOUT) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
