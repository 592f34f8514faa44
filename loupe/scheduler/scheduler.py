"""Continuous batching: which requests run in each forward pass, and with how many tokens.

Every step builds one batch. Requests that need one more token (decodes) come first; then
prompt chunks fill the prefill budget (`chunked_prefill_size`) — first the requests already
part-way through their prompt, then new ones from the waiting queue, first come first
served. When a decode cannot get a KV page, the most recently admitted request is
retracted: its computed KV goes to the prefix cache, and it waits at the head of the queue
to be resumed, prompt and output so far, with the same result.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque

import torch

from loupe.config import ServerArgs
from loupe.distributed.parallel import Comm, Ranks
from loupe.model.loader import LoadedModel, load_model
from loupe.runner.attention import KVCache
from loupe.runner.model_runner import ModelRunner
from loupe.scheduler.cache import PagePool, RadixCache, SlotTable
from loupe.scheduler.request import FinishReason, Req, RequestLimits, SamplingParams

CPU_KV_BUDGET_BYTES = 2 << 30


def resolve_device(device: str, index: int = 0) -> torch.device:
    """The device of a rank; `index` picks its GPU among this machine's."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if device == "cuda":
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device(device)


class Scheduler:
    """Every rank of a parallel replica runs one, on the same requests: they decide alike."""

    def __init__(self, args: ServerArgs, loaded: LoadedModel | None = None, comm: Comm | None = None):
        self.args = args
        self.comm = comm or Comm(Ranks())
        self.device = self.comm.device if comm else resolve_device(args.device)
        t0 = time.perf_counter()
        self.model = loaded or load_model(args.model_path, args.dtype, self.device.type, args.context_length,
                                          self.comm)
        self.load_seconds = time.perf_counter() - t0
        config = self.model.config
        self.tokenizer = self.model.tokenizer
        self.eos_ids = set(self.model.eos_token_ids)
        self.context_length = args.context_length or config.max_position_embeddings
        self.page_size = args.page_size
        dtype = next(self.model.model.parameters()).dtype
        attention = self.model.model.layers[0].self_attn
        num_layers, num_kv_heads = len(self.model.model.layers), attention.num_kv_heads  # this rank's share
        per_token = KVCache.bytes_per_token(num_layers, num_kv_heads, config.head_dim, dtype)
        # Ranks measure their free memory apart, but must all hold the same number of pages.
        max_tokens = self.comm.agree_min(args.max_total_tokens or self._default_kv_tokens(per_token))
        num_pages = max_tokens // self.page_size + 1  # page 0 is reserved
        self.pool = PagePool(num_pages, self.page_size)
        self.tree = RadixCache(self.pool, enabled=not args.disable_radix_cache)
        self.slots = SlotTable(args.max_running_requests, self.context_length, self.page_size, self.device)
        kv = KVCache(num_layers, num_pages * self.page_size, num_kv_heads, config.head_dim, dtype, self.device)
        self.runner = ModelRunner(self.model, kv, self.slots, self.device)
        self.max_total_tokens = (num_pages - 1) * self.page_size
        self.limits = RequestLimits(config.vocab_size, self.context_length, self.max_total_tokens)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted, in admission order
        self.seeds = random.Random(args.random_seed)
        self.num_forward_steps = 0
        self.tracer = None  # a tracing.spans.SchedulerTracer when tracing is on

    def _default_kv_tokens(self, per_token: int) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.8)
        else:  # the machine's share, split between the ranks and replicas that run on it
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(available // 10, CPU_KV_BUDGET_BYTES) // self.args.ranks_per_node
        return max(budget // per_token, 4 * self.page_size)

    # ---- requests in and out -------------------------------------------------------------

    def make_request(self, rid: str, input_ids: list[int], sampling: SamplingParams) -> Req:
        """Validate a request against this model's limits; ValueError if it cannot run."""
        self.limits.check(input_ids, sampling)
        return Req(rid, list(input_ids), sampling, self.seeds.getrandbits(63))

    def add_request(self, req: Req) -> None:
        self.waiting.append(req)

    def abort(self, rid: str) -> Req | None:
        """Finish a request with reason `abort`, freeing its KV pages at once."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    self._release(req, cache=False)
                    req.finish_reason = FinishReason.ABORT
                    req.event("abort")
                    self._finish(req)
                    return req
        return None

    def abort_all(self) -> list[Req]:
        """Abort every request (at shutdown), closing their spans."""
        return [self.abort(req.rid) for req in [*self.running, *self.waiting]]

    def _finish(self, req: Req) -> None:
        req.finish_time = time.perf_counter()
        if self.tracer:
            self.tracer.on_finish(req)

    @property
    def kv_used_tokens(self) -> int:
        """Tokens of KV held by running requests and by locked prefixes (not evictable)."""
        used_pages = self.pool.num_pages - 1 - len(self.pool.free_pages) - self.tree.evictable_pages
        return used_pages * self.page_size

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------

    def step(self) -> list[Req]:
        """Run one forward pass. Returns the requests that gained a token (some now finished)."""
        batch = self.schedule()
        if not batch:
            return []
        reqs = [r for r, _ in batch]
        num_new = [n for _, n in batch]
        started = time.perf_counter_ns() if self.tracer else 0
        tokens = self.runner.forward(reqs, num_new)
        self.num_forward_steps += 1
        updated = []
        for req, n, token in zip(reqs, num_new, tokens, strict=True):
            req.kv_len += n
            if token is None:
                continue
            if not req.output_ids:
                req.first_token_time = time.perf_counter()
            req.output_ids.append(token)
            self._check_finished(req, token)
            updated.append(req)
        if self.tracer:
            self.tracer.on_forward(reqs, num_new, started, time.perf_counter_ns())
        for req in updated:
            if req.finished:
                self.running.remove(req)
                self._release(req, cache=True)
                self._finish(req)
        return updated

    def schedule(self) -> list[tuple[Req, int]]:
        batch: list[tuple[Req, int]] = []
        retracted: set[Req] = set()
        for req in [r for r in self.running if r.kv_len == r.seq_len - 1]:
            if req in retracted:
                continue
            while not self._grow(req, req.kv_len + 1):
                victim = self.running[-1]
                self._retract(victim)
                retracted.add(victim)
                if victim is req:
                    break
            else:
                batch.append((req, 1))

        budget = self.args.chunked_prefill_size
        for req in self.running:
            if budget > 0 and req.kv_len < req.seq_len - 1 and req not in retracted:
                n = min(req.seq_len - req.kv_len, budget)
                if not self._grow(req, req.kv_len + n):
                    break
                batch.append((req, n))
                budget -= n

        while budget > 0 and self.waiting and len(self.running) < self.args.max_running_requests and not retracted:
            req = self.waiting[0]
            if not self._admit(req):
                break
            n = min(req.seq_len - req.kv_len, budget)
            # Keep a page per running request spare, so admission does not force a retraction.
            if not self._grow(req, req.kv_len + n, reserve=len(self.running)):
                self._release(req, cache=False)
                break
            self.waiting.popleft()
            self._admitted(req)
            batch.append((req, n))
            budget -= n
        return batch

    # ---- KV bookkeeping (invariants in scheduler/cache.py) -------------------------------------

    def _admit(self, req: Req) -> bool:
        row = self.slots.alloc_row()
        if row is None:
            return False
        pages, node = self.tree.match_prefix(req.all_ids[: req.seq_len - 1])
        self.tree.lock(node)
        req.row, req.prefix_node, req.pages, req.num_tree_pages = row, node, list(pages), len(pages)
        req.kv_len = len(pages) * self.page_size
        self.slots.write_pages(row, 0, pages)
        return True

    def _admitted(self, req: Req) -> None:
        """`req` has joined the running batch (for the first time, or again after a retraction)."""
        self.running.append(req)
        if req.cached_tokens is None:
            req.cached_tokens = min(req.kv_len, len(req.prompt_ids))
            req.admit_time = time.perf_counter()
            req.event("queue.admitted", queue_seconds=req.admit_time - req.arrival_time)
            hit = "prefix_cache.hit" if req.cached_tokens else "prefix_cache.miss"
            req.event(hit, cached_tokens=req.cached_tokens, prompt_tokens=len(req.prompt_ids))
        if self.tracer:
            self.tracer.on_admit(req)

    def _grow(self, req: Req, new_len: int, reserve: int = 0) -> bool:
        """Give `req` pages for its first `new_len` tokens; False if memory is short."""
        needed = -(-new_len // self.page_size) - len(req.pages)
        if needed <= 0:
            return True
        shortfall = needed + reserve - len(self.pool.free_pages)
        if shortfall > 0:
            self.tree.evict(shortfall)
        if len(self.pool.free_pages) < needed + reserve:
            return False
        pages = self.pool.alloc(needed)
        self.slots.write_pages(req.row, len(req.pages), pages)
        req.pages.extend(pages)
        return True

    def _release(self, req: Req, cache: bool) -> None:
        """Give back a request's row and pages; with `cache`, its computed pages go to the tree."""
        if req.row is None:
            return
        own = req.pages[req.num_tree_pages :]
        if cache and self.tree.enabled:
            num_full = req.kv_len // self.page_size
            already = self.tree.insert(req.all_ids[: num_full * self.page_size], req.pages[:num_full])
            own = req.pages[req.num_tree_pages : already] + req.pages[num_full:]
        self.pool.free(own)
        self.tree.unlock(req.prefix_node)
        self.slots.free_row(req.row)
        req.row, req.prefix_node, req.pages, req.num_tree_pages, req.kv_len = None, None, [], 0, 0

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        self._release(req, cache=True)
        req.num_retractions += 1
        req.event("retracted", completion_tokens=len(req.output_ids), retractions=req.num_retractions)
        if self.tracer:
            self.tracer.on_retract(req)
        self.waiting.appendleft(req)

    def _check_finished(self, req: Req, token: int) -> None:
        sp = req.sampling
        if (token in self.eos_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            req.finish_reason, req.matched_stop = FinishReason.STOP, token
        elif len(req.output_ids) >= sp.max_new_tokens or req.seq_len >= self.context_length:
            req.finish_reason = FinishReason.LENGTH
        elif sp.stop:
            window = max(len(s) for s in sp.stop) + 2
            tail = self.tokenizer.decode(req.output_ids[-window:])
            for s in sp.stop:
                if s in tail:
                    req.finish_reason, req.matched_stop = FinishReason.STOP, s
                    break
