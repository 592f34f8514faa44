"""Continuous batching: which requests run in each forward pass, and with how many tokens.

Every step builds one batch. Requests that need one more token (decodes) come first; then
prompt chunks fill the prefill budget (`chunked_prefill_size`) — first the requests already
part-way through their prompt, then new ones from the waiting queue, first come first
served. When a decode cannot get a KV page, the most recently admitted request is
retracted: its computed KV goes to the prefix cache, and it waits at the head of the queue
to be resumed, prompt and output so far, with the same result.

The scheduler decides; the worker beneath it (runner/worker.py) runs the model, and the
KVManager (scheduler/cache.py) hands out and takes back each request's pages.

On a prefill server (disagg/prefill.py) a request from the router stops after its first
token and waits, pages held, until the decode server claims its KV. On a decode server
(disagg/decode.py) such a request skips the prompt: it waits in `receiving` for pages, its
KV is claimed from the prefill server, and it joins the batch as a decode once it arrives.
"""

from __future__ import annotations

import random
import time
from collections import deque

from loupe.config import SchedulerSettings
from loupe.core import FinishReason, TokenizedRequest, TokenLogprob
from loupe.disagg.decode import DecodeIntake
from loupe.disagg.prefill import PrefillHandoff
from loupe.runner.worker import Worker
from loupe.scheduler.cache import KVManager
from loupe.scheduler.request import Req
from loupe.stops import StopRules


class Scheduler:
    """Every rank of a parallel replica runs one, on the same requests: they decide alike."""

    def __init__(self, worker: Worker, settings: SchedulerSettings):
        self.worker = worker
        self.settings = settings
        self.kv = KVManager(worker.num_pages, worker.page_size, worker.slot_table, not settings.disable_radix_cache)
        self.stops = StopRules(worker.tokenizer, set(worker.model.eos_token_ids), worker.context_length)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted, in admission order
        self.seeds = random.Random(settings.random_seed)
        self.num_forward_steps = 0
        self.num_decoding = 0  # in the latest batch
        self.tracer = None  # a tracing.spans.SchedulerTracer when tracing is on
        self.handoff: PrefillHandoff | None = None  # on a prefill server
        self.intake: DecodeIntake | None = None  # on a decode server
        self.receiving: deque[Req] = deque()  # decode server: waiting for pages to claim their KV into

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: TokenizedRequest) -> Req:
        """Queue a request, validated where it entered (TokenizedRequest.validated)."""
        req = Req(request, self.seeds.getrandbits(63))
        (self.receiving if self.intake and req.bootstrap else self.waiting).append(req)
        if self.handoff and req.bootstrap:
            self.handoff.expect(req.bootstrap.room)
        if self.tracer:
            self.tracer.arrived(req)
        return req

    def abort(self, rid: str) -> Req | None:
        """Finish a request with reason `abort`, freeing its KV pages at once."""
        req = next((r for r in (*self.waiting, *self.running, *self.receiving) if r.rid == rid), None)
        if req is not None:
            for queue in (self.waiting, self.running, self.receiving):
                if req in queue:
                    queue.remove(req)
            if self.handoff and req.bootstrap:
                self.handoff.aborted(req.bootstrap.room)
        elif self.handoff:
            req = self.handoff.discard(rid)
        elif self.intake:
            req = self.intake.discard(rid, detach=self.kv.detach)
        if req is None:
            return None
        self._drop(req)
        return req

    def abort_all(self) -> list[Req]:
        """Abort every request (at shutdown), closing their spans."""
        held = [r for holder in (self.handoff, self.intake) if holder for r in holder.requests]
        return [self.abort(req.rid) for req in [*self.running, *self.waiting, *self.receiving, *held]]

    @property
    def runnable(self) -> bool:
        """Whether the next step has a batch to run."""
        return bool(self.waiting or self.running)

    @property
    def kv_sockets(self) -> list:
        """The sockets KV exchanges with other servers arrive on (a wait should watch them)."""
        return [sock for holder in (self.handoff, self.intake) if holder for sock in holder.sockets]

    @property
    def kv_busy(self) -> bool:
        """Whether KV is moving in a way that no socket announces (so waits must be short)."""
        return any(holder.busy for holder in (self.handoff, self.intake) if holder)

    @property
    def kv_rejected(self) -> dict[str, int]:
        """Frames other servers sent that were not valid messages, by reason (running totals)."""
        if self.handoff:
            return self.handoff.rejected_counts
        return dict(self.intake.rejected) if self.intake else {}

    @property
    def has_work(self) -> bool:
        held = any(holder.pending for holder in (self.handoff, self.intake) if holder)
        return self.runnable or bool(self.receiving) or held

    # ---- one step --------------------------------------------------------------------------

    def step(self) -> list[Req]:
        """Run one forward pass. Returns the requests that gained a token (some now finished),
        or that ended otherwise (their KV handed over or never come)."""
        arrived, updated = self._exchange_kv() if self.handoff or self.intake else ([], [])
        batch = self.schedule()
        if batch:
            reqs, num_new = [r for r, _ in batch], [n for _, n in batch]
            started = time.perf_counter_ns() if self.tracer else 0
            sampled = self.worker.forward(reqs, num_new)
            self.num_forward_steps += 1
            computed = self.postprocess(reqs, num_new, sampled.tokens, sampled.logprobs)
            if self.tracer:
                self.tracer.forward(reqs, num_new, started, time.perf_counter_ns(), self.num_forward_steps,
                                    self.num_decoding)
            updated += [req for req in computed if not (self.handoff and self._hand_off(req))]
        self.running += arrived  # after this step's batch: their first output is the token that came
        updated += arrived
        for req in updated:
            if req.finished and req in self.running:
                self.running.remove(req)
                self.kv.release(req, cache=True)
                self._finish(req, req.finish_reason)
        return updated

    def schedule(self) -> list[tuple[Req, int]]:
        """This step's batch: (request, tokens to compute) pairs."""
        retracted: set[Req] = set()
        batch = self._schedule_decodes(retracted)
        self.num_decoding = len(batch)  # the batch's first entries are decodes
        budget = self.settings.chunked_prefill_size
        for req in self.running:
            if budget > 0 and req.kv_len < req.seq_len - 1 and req not in retracted:
                n = min(req.seq_len - req.kv_len, budget)
                if not self.kv.grow(req, req.kv_len + n):
                    break
                batch.append((req, n))
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
            batch.append((req, n))
            budget -= n
        return batch

    def postprocess(self, reqs: list[Req], num_new: list[int], tokens: list[int | None],
                    logprobs: list[TokenLogprob | None] | None = None) -> list[Req]:
        """Count the computed KV, take each sampled token (and its logprobs, where asked) and
        check whether it ends its request."""
        updated = []
        for i, (req, n, token) in enumerate(zip(reqs, num_new, tokens, strict=True)):
            req.kv_len += n
            if token is None:
                continue
            if not req.output_ids:
                req.first_token_time = time.perf_counter()
            req.output_ids.append(token)
            if logprobs is not None and logprobs[i] is not None:
                req.output_logprobs.append(logprobs[i])
            req.finish_reason, req.matched_stop = self.stops.check(req.sampling, req.output_ids, req.seq_len)
            updated.append(req)
        return updated

    def _exchange_kv(self) -> tuple[list[Req], list[Req]]:
        """Disaggregation, once a step. A decode server claims KV for the requests it has pages
        for, and takes in those whose KV came; a prefill server answers claims, and finishes the
        requests whose KV left. (The requests whose KV and first token arrived, those ended.)"""
        arrived, done = [], []
        if self.intake:
            while self.receiving and self.kv.admit_external(self.receiving[0],
                                                            len(self.receiving[0].prompt_ids)) is not None:
                req = self.receiving.popleft()
                self.intake.claim(req)
                if self.tracer:
                    self.tracer.kv_claimed(req)
            for req in self.intake.poll():
                if req.error:
                    self._drop(req)
                    done.append(req)
                    continue
                req.admit_time = req.first_token_time = time.perf_counter()
                req.cached_tokens = 0
                req.finish_reason, req.matched_stop = self.stops.check(req.sampling, req.output_ids, req.seq_len)
                arrived.append(req)
                if self.tracer:
                    self.tracer.kv_arrived(req)
            while self.intake.released:  # pages of aborted requests that no write can reach now
                self.kv.release(self.intake.released.pop(), cache=False)
        if self.handoff:
            for req in self.handoff.poll():
                done.append(req)
                if self.tracer:
                    self.tracer.kv_sent(req)
                if req.error:
                    self._drop(req)
                else:
                    self.kv.release(req, cache=True)
                    self._finish(req, req.finish_reason or FinishReason.LENGTH)  # its one token
            if self.handoff.orphans:
                done += self._drop_orphans(self.handoff.take_orphans())
        return arrived, done

    def _drop_orphans(self, orphans: dict[int, str]) -> list[Req]:
        """Prefill server: fail the requests whose decode server has gone, before their prompt runs on."""
        dropped = []
        for queue in (self.waiting, self.running):
            for req in [r for r in queue if r.bootstrap and r.bootstrap.room in orphans]:
                queue.remove(req)
                req.error = f"the KV of room {req.bootstrap.room} was not handed over: {orphans[req.bootstrap.room]}"
                self._drop(req)
                dropped.append(req)
        return dropped

    def _hand_off(self, req: Req) -> bool:
        """On a prefill server: whether `req` (with its first token) now waits for its decode server."""
        if req.bootstrap is None:
            return False
        self.running.remove(req)
        self.handoff.hand_off(req)
        if self.tracer:
            self.tracer.handed_off(req)
        return True

    def _drop(self, req: Req) -> None:
        """Aborted, or failed (`req.error`): its pages go back uncached."""
        self.kv.release(req, cache=False)
        self._finish(req, FinishReason.ABORT)

    def _schedule_decodes(self, retracted: set[Req]) -> list[tuple[Req, int]]:
        """A token each for the decoding requests, retracting the newest while pages run out."""
        batch = []
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
                batch.append((req, 1))
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
        self.kv.retract(req)
        req.num_retractions += 1
        if self.tracer:
            self.tracer.retracted(req)
        self.waiting.appendleft(req)

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        if self.tracer:
            self.tracer.finished(req)
