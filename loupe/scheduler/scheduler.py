"""Continuous batching: which requests run in each forward pass, and with how many tokens.

Every step builds one batch. Requests that need one more token (decodes) come first; then
prompt chunks fill the prefill budget (`chunked_prefill_size`) — first the requests already
part-way through their prompt, then new ones from the waiting queue, first come first
served. When a decode cannot get a KV page, the most recently admitted request is
retracted: its computed KV goes to the prefix cache, and it waits at the head of the queue
to be resumed, prompt and output so far, with the same result.

The scheduler decides; the worker beneath it (runner/worker.py) runs the model, and the
KVManager (scheduler/cache.py) hands out and takes back each request's pages. What differs on
a prefill or decode server is one object given at construction (scheduler/exchange.py), and
so is the tracer.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field

from loupe.config import SchedulerSettings
from loupe.core import FinishReason, TokenizedRequest
from loupe.runner.model_runner import Sampled
from loupe.runner.worker import Worker
from loupe.scheduler.cache import KVManager
from loupe.scheduler.exchange import NoExchange
from loupe.scheduler.request import Req
from loupe.stops import StopRules
from loupe.tracing.spans import SchedulerTracer


@dataclass
class Batch:
    """One forward pass: `reqs[i]` computes `num_new[i]` tokens; the first `num_decode` are
    decodes (one token each), the rest prefill chunks."""

    reqs: list[Req] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    num_decode: int = 0

    def add(self, req: Req, n: int) -> None:
        self.reqs.append(req)
        self.num_new.append(n)

    def __len__(self) -> int:
        return len(self.reqs)


class Scheduler:
    """Every rank of a parallel replica runs one, on the same requests: they decide alike."""

    def __init__(self, worker: Worker, settings: SchedulerSettings, exchange: NoExchange | None = None,
                 tracer: SchedulerTracer | None = None):
        self.worker = worker
        self.settings = settings
        self.kv = KVManager(worker.num_pages, worker.page_size, worker.slot_table, not settings.disable_radix_cache)
        self.stops = StopRules(worker.tokenizer, set(worker.model.eos_token_ids), worker.context_length)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted, in admission order
        self.seeds = random.Random(settings.random_seed)
        self.num_forward_steps = 0
        self.exchange = exchange or NoExchange()
        self.tracer = tracer

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: TokenizedRequest) -> Req:
        """Queue a request, validated where it entered (TokenizedRequest.validated)."""
        req = Req(request, self.seeds.getrandbits(63))
        if self.tracer:
            self.tracer.arrived(req, len(self.running), len(self.waiting))
        if not self.exchange.add(req):
            self.waiting.append(req)
        return req

    def abort(self, rid: str) -> Req | None:
        """Finish a request with reason `abort`, freeing its KV pages at once."""
        req = next((r for r in (*self.waiting, *self.running) if r.rid == rid), None)
        if req is not None:
            (self.waiting if req in self.waiting else self.running).remove(req)
            self.exchange.aborted(req)
        else:
            req = self.exchange.discard(rid, self)
        if req is not None:
            self.drop(req)
        return req

    def abort_all(self) -> list[Req]:
        """Abort every request (at shutdown), closing their spans."""
        return [self.abort(req.rid) for req in [*self.running, *self.waiting, *self.exchange.held()]]

    @property
    def runnable(self) -> bool:
        """Whether the next step has a batch to run."""
        return bool(self.waiting or self.running)

    @property
    def has_work(self) -> bool:
        return self.runnable or self.exchange.pending

    # ---- one step --------------------------------------------------------------------------

    def step(self) -> list[Req]:
        """Run one forward pass. Returns the requests that gained a token (some now finished),
        or that ended otherwise (their KV handed over or never come)."""
        arrived, updated = self.exchange.step(self)
        batch = self.schedule()
        if batch:
            started = time.perf_counter_ns() if self.tracer else 0
            sampled = self.worker.forward(batch.reqs, batch.num_new)
            self.num_forward_steps += 1
            computed = self.postprocess(batch, sampled)
            if self.tracer:
                self.tracer.forward(batch.reqs, batch.num_new, started, time.perf_counter_ns(),
                                    self.num_forward_steps, batch.num_decode)
            updated += [req for req in computed if not self.exchange.prefilled(req, self)]
        self.running += arrived  # after this step's batch: their first output is the token that came
        updated += arrived
        for req in updated:
            if req.finished and req in self.running:
                self.running.remove(req)
                self.kv.release(req, cache=True)
                self.finish(req, req.finish_reason)
        return updated

    def schedule(self) -> Batch:
        """This step's batch: decodes first, then prefill chunks."""
        retracted: set[Req] = set()
        batch = self._schedule_decodes(retracted)
        budget = self.settings.chunked_prefill_size
        for req in self.running:
            if budget > 0 and req.kv_len < req.seq_len - 1 and req not in retracted:
                n = min(req.seq_len - req.kv_len, budget)
                if not self.kv.grow(req, req.kv_len + n):
                    break
                batch.add(req, n)
                budget -= n
        while budget > 0 and self.waiting and not retracted and len(self.running) < self.settings.max_running_requests:
            req = self.waiting[0]
            if not self.kv.admit(req):
                break
            n = min(req.seq_len - req.kv_len, budget)
            # Keep a page per running request spare, so admission does not force a retraction.
            if not self.kv.grow(req, req.kv_len + n, reserve=len(self.running)):
                self.kv.release(req, cache=False)
                break
            self.waiting.popleft()
            self._admitted(req)
            batch.add(req, n)
            budget -= n
        return batch

    def postprocess(self, batch: Batch, sampled: Sampled) -> list[Req]:
        """Count the computed KV, take each sampled token (and its logprobs, where asked) and
        check whether it ends its request."""
        updated = []
        logprobs = sampled.logprobs or [None] * len(batch)
        for req, n, token, logprob in zip(batch.reqs, batch.num_new, sampled.tokens, logprobs, strict=True):
            req.kv_len += n
            if token is None:
                continue
            if not req.output_ids:
                req.first_token_time = time.perf_counter()
            req.output_ids.append(token)
            if logprob is not None:
                req.output_logprobs.append(logprob)
            req.finish_reason, req.matched_stop = self.stops.check(req.sampling, req.output_ids, req.seq_len)
            updated.append(req)
        return updated

    def drop(self, req: Req) -> None:
        """Aborted, or failed (`req.error`): its pages go back uncached."""
        self.kv.release(req, cache=False)
        self.finish(req, FinishReason.ABORT)

    def _schedule_decodes(self, retracted: set[Req]) -> Batch:
        """A token each for the decoding requests, retracting the newest while pages run out."""
        batch = Batch()
        for req in [r for r in self.running if r.kv_len == r.seq_len - 1]:
            if req in retracted:
                continue
            while not self.kv.grow(req, req.kv_len + 1):
                victim = self.running[-1]
                self._retract(victim)
                retracted.add(victim)
                if victim is req:
                    break
            else:
                batch.add(req, 1)
        batch.num_decode = len(batch)
        return batch

    def _admitted(self, req: Req) -> None:
        """`req` has joined the running batch (for the first time, or again after a retraction)."""
        self.running.append(req)
        if req.cached_tokens is None:
            req.cached_tokens = min(req.kv_len, len(req.prompt_ids))
            req.admit_time = time.perf_counter()
        if self.tracer:
            self.tracer.admitted(req)

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        self.kv.release(req, cache=True)  # its computed KV goes to the prefix tree, for its next admission
        req.num_retractions += 1
        if self.tracer:
            self.tracer.retracted(req)
        self.waiting.appendleft(req)

    def finish(self, req: Req, reason: FinishReason) -> None:
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        if self.tracer:
            self.tracer.finished(req)
