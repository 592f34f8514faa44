"""Pick the next token of each request from its logits, and report its logprob if asked."""

from __future__ import annotations

import torch

from loupe.core import SamplingParams, TokenLogprob

MIN_TEMPERATURE = 1e-5


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """`logits` is `[batch, vocab]` float32. Greedy rows take the argmax; the others draw with
    their request's own generator, so a seeded request gives the same tokens in any batch."""
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    probs = filtered_probs(logits[rows], [params[i] for i in rows])
    for j, i in enumerate(rows):
        # Generators live on the CPU; drawing there keeps seeded output device-independent.
        tokens[i] = int(torch.multinomial(probs[j].cpu(), 1, generator=generators[i]))
    return tokens


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p."""
    device = logits.device
    # Any temperature this low is greedy in effect; a lower one (1e-40 is 0 in float32) would
    # make the logits infinite and the draw fail.
    temperature = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params], device=device)
    logits = logits / temperature[:, None]
    top_k = [min(p.top_k, logits.shape[-1]) for p in params]  # a larger k limits nothing (and may not fit int64)
    if any(k > 0 for k in top_k):
        k_max = max(top_k)
        kth = logits.topk(min(k_max, logits.shape[-1]), dim=-1).values
        k_index = torch.tensor([(k if k > 0 else k_max) - 1 for k in top_k], device=device)
        threshold = kth.gather(1, k_index.clamp(max=kth.shape[1] - 1)[:, None])
        no_limit = torch.tensor([k <= 0 for k in top_k], device=device)[:, None]
        logits = logits.masked_fill((logits < threshold) & ~no_limit, float("-inf"))
    probs = logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if (top_p < 1).any():
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        drop[:, 0] = False  # the likeliest token stays, however small top_p (it may be 0 in float32)
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if (min_p > 0).any():
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_n: list[int]) -> list[TokenLogprob]:
    """Each row's chosen token's logprob and its `top_n[i]` most likely tokens, from the
    log-softmax of the raw logits in float32: the model's distribution, before temperature and
    the filters, as OpenAI and vLLM report it (so a greedy token's logprob is its row's largest)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(max(top_n), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(token, logprob, list(zip(ids[i][:n], values[i][:n], strict=True)))
            for i, (token, logprob, n) in enumerate(zip(tokens, chosen, top_n, strict=True))]
