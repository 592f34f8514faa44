"""One forward pass over a batch of requests: build the inputs, run the model, sample."""

from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

from loupe.core import SamplingParams, TokenLogprob
from loupe.model.attention import AttentionGroup, ForwardBatch, KVCache
from loupe.model.loader import LoadedModel
from loupe.runner.sampler import sample, token_logprobs

if TYPE_CHECKING:
    from loupe.runner.compiled import CompiledDecode


class Sequence(Protocol):
    """What the runner reads of a request (the scheduler's Req is one)."""

    row: int  # its row of the slot table
    kv_len: int  # tokens whose KV is in the cache already
    seq_len: int
    all_ids: list[int]  # prompt and output so far
    output_ids: list[int]
    sampling: SamplingParams
    generator: torch.Generator


class Sampled(NamedTuple):
    """One forward pass's result, request by request (in the order the batch gave them)."""

    tokens: list[int | None]  # the next token; None for a prefill still going
    logprobs: list[TokenLogprob | None] | None  # of that token, where asked; None if none asked


def in_order(order: list[int], sampled_rows: list[int], values: list) -> list:
    """`values` (one per sampled row of the sorted batch) placed at each request's position in
    the batch as given, None for the requests that sampled nothing."""
    result = [None] * len(order)
    for row, value in zip(sampled_rows, values, strict=True):
        result[order[row]] = value
    return result


class ModelRunner:
    """Runs this rank's part of the model. With pipeline stages, each stage takes the hidden
    states from the one before and hands its own to the next; the last samples."""

    def __init__(self, loaded: LoadedModel, kv: KVCache, slot_table: torch.Tensor, device: torch.device):
        self.model = loaded.model
        self.compiled: CompiledDecode | None = None  # a faster forward pass for some decode batches
        self.comm = loaded.model.comm
        self.hidden_size = loaded.config.hidden_size
        self.kv = kv
        self.slot_table = slot_table  # [row, position] -> KV slot
        self.device = device

    @torch.inference_mode()
    def forward(self, reqs: list[Sequence], num_new: list[int]) -> Sampled:
        """Compute `num_new[i]` more tokens of each request's KV. Returns the sampled next
        token of each request whose input this completes (None for unfinished prefills), and
        its logprobs if it asked for them."""
        order = sorted(range(len(reqs)), key=lambda i: num_new[i] != 1)  # single queries first
        reqs = [reqs[i] for i in order]
        num_new = [num_new[i] for i in order]
        batch, input_ids, positions = self._prepare(reqs, num_new)
        ranks = self.comm.ranks
        previous = None
        if not ranks.is_first_stage:
            previous = self.comm.recv_from_previous_stage((len(input_ids), self.hidden_size), self.kv.k.dtype)
        if self.compiled is not None and self.compiled.serves(batch, len(input_ids)):
            hidden = self.compiled(input_ids, positions, batch)
        else:
            hidden = self.model(input_ids, positions, batch, previous)
        if not ranks.is_last_stage:
            self.comm.send_to_next_stage(hidden)

        sampling = [i for i, req in enumerate(reqs) if req.kv_len + num_new[i] == req.seq_len]  # input complete
        if not sampling:  # prefill chunks only
            return Sampled([None] * len(reqs), None)
        offsets = list(accumulate(num_new))
        ends = [offsets[i] - 1 for i in sampling]  # their last tokens' rows of `hidden`
        chosen = [reqs[i] for i in sampling]
        asked = [j for j, r in enumerate(chosen) if r.sampling.logprobs]  # rows of `logits`
        sampled = found = None
        if ranks.is_last_stage:
            logits = self.model.compute_logits(hidden[ends], batch.exact)
            sampled = sample(logits, [r.sampling for r in chosen], [r.generator for r in chosen])
            if asked:
                found = token_logprobs(logits[asked], [sampled[j] for j in asked],
                                       [chosen[j].sampling.top_logprobs for j in asked])
        tokens = self.comm.share_tokens(sampled, len(sampling))
        logprobs = (in_order(order, [sampling[j] for j in asked], self.comm.share_from_last_stage(found))
                    if asked else None)  # only when a request here asked
        return Sampled(in_order(order, sampling, tokens), logprobs)

    def _prepare(self, reqs: list[Sequence], num_new: list[int]) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
        input_ids: list[int] = []
        positions: list[int] = []
        for req, n in zip(reqs, num_new, strict=True):
            start = req.kv_len
            if n == 1 and req.output_ids and start == req.seq_len - 1:
                input_ids.append(req.output_ids[-1])
            else:
                input_ids.extend(req.all_ids[start : start + n])
            positions.extend(range(start, start + n))
        rows = torch.tensor([r.row for r in reqs])
        starts = torch.tensor([r.kv_len for r in reqs])
        counts = torch.tensor(num_new)
        ids_t = torch.tensor(input_ids, device=self.device)
        pos_t = torch.tensor(positions, device=self.device)
        out_slots = self.slot_table[torch.repeat_interleave(rows, counts).to(self.device), pos_t]

        num_decode = num_new.count(1)  # single queries come first
        decode = prefill = None
        if num_decode:
            decode = self._group(rows[:num_decode], starts[:num_decode], counts[:num_decode])
        causal = len(reqs) - num_decode == 1 and int(starts[-1]) == 0
        if num_decode < len(reqs) and not causal:
            prefill = self._group(rows[num_decode:], starts[num_decode:], counts[num_decode:])
        batch = ForwardBatch(self.kv, out_slots, num_decode, decode, prefill, causal, exact=num_decode < len(input_ids))
        return batch, ids_t, pos_t

    def _group(self, rows: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor) -> AttentionGroup:
        device = self.device
        ends = starts + counts
        num_keys, num_queries = int(ends.max()), int(counts.max())
        slots = self.slot_table[rows.to(device), :num_keys]
        key_pos = torch.arange(num_keys)
        query_index = None
        if num_queries == 1:  # one mask for any two or more, alike or not: one compiled graph (compiled.py)
            mask = None if len(rows) == 1 else (key_pos[None, :] < ends[:, None])[:, None, None, :].to(device)
        else:
            query_pos = torch.arange(num_queries)
            mask = (key_pos[None, None, :] <= (starts[:, None] + query_pos[None, :])[:, :, None])[:, None].to(device)
            query_index = torch.cat([b * num_queries + torch.arange(int(n)) for b, n in enumerate(counts)]).to(device)
        return AttentionGroup(slots, mask, query_index, num_queries)
