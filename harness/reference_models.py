"""transformers' own model on the bundled checkpoint's weights: the reference loupe must match;
and loupe's logits step by step, to hold against it."""

from __future__ import annotations

import torch
import transformers

from loupe.core import SamplingParams, TokenizedRequest
from loupe.model.gguf_loader import bundled_model_path
from loupe.model.loader import read_checkpoint
from loupe.scheduler.request import Req
from loupe.scheduler.scheduler import Scheduler


def bundled_reference() -> tuple[transformers.LlamaForCausalLM, object]:
    """(float32 transformers model, tokenizer) of the bundled SmolLM2 GGUF, dequantised as loupe loads it."""
    hf_config, state_dict, tokenizer = read_checkpoint(bundled_model_path())
    config = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "architectures"})
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict(state_dict, strict=False)
    reference.tie_weights()
    return reference, tokenizer


def loupe_step_logits(scheduler: Scheduler, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """loupe's logits through its paged cache: of every prompt position it computes (the
    prefill; a prefix found cached is not computed again), then of one decode step per token
    of `continuation`."""
    req = Req(TokenizedRequest("logits", prompt, SamplingParams(max_new_tokens=len(continuation) + 1)), seed=0)
    assert scheduler.kv.admit(req)
    runner = scheduler.worker.runner
    out = []
    for token in [None, *continuation]:
        if token is not None:
            req.output_ids.append(token)
        n = req.seq_len - req.kv_len
        assert scheduler.kv.grow(req, req.seq_len)
        batch, ids, pos = runner._prepare([req], [n])
        with torch.inference_mode():
            out.append(runner.model.compute_logits(runner.model(ids, pos, batch), batch.exact))  # as the engine runs it
        req.kv_len += n
    scheduler.kv.release(req, cache=False)
    return out
