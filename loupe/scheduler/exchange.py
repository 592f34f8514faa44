"""What a scheduler does besides batching on one server of a prefill/decode pair, given to it
at construction as one object. `NoExchange`: a server that runs whole requests. `PrefillSide`:
a request from the router stops after its first token and waits, pages held, until the decode
server claims its KV (disagg/prefill.py). `DecodeSide`: such a request skips its prompt; it
waits here for pages, its KV is claimed from the prefill server (disagg/decode.py), and it
joins the batch as a decode once it arrives."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from loupe.config import ExchangeSettings
from loupe.core import FinishReason
from loupe.disagg.decode import DecodeIntake
from loupe.disagg.prefill import PrefillHandoff
from loupe.runner.worker import Worker
from loupe.scheduler.request import Req

if TYPE_CHECKING:
    from loupe.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


def exchange_for(settings: ExchangeSettings, worker: Worker) -> NoExchange:
    """The side of the KV exchange this server runs (--disaggregation-mode)."""
    mode, timeout = settings.disaggregation_mode, settings.disaggregation_timeout
    backend, secret = settings.disaggregation_transfer_backend, settings.disaggregation_secret
    if mode == "prefill":
        host, port = settings.bootstrap_host, settings.disaggregation_bootstrap_port
        handoff = PrefillHandoff(host, port, worker.kv, worker.kv_layout, timeout, backend, secret)
        logger.info("prefill server: bootstrap port %s:%d (%s), KV by %s", host, port,
                    "secret given" if secret else "loopback, no secret", backend)
        return PrefillSide(handoff)
    if mode == "decode":
        return DecodeSide(DecodeIntake(worker.kv, worker.kv_layout, timeout, backend, secret))
    return NoExchange()


class NoExchange:
    """No KV comes or goes."""

    sockets: list = []  # where KV exchanges arrive (a wait should watch them)
    busy = False  # KV moving in a way that no socket announces (so waits must be short)
    pending = False  # requests held here

    def rejected(self) -> dict[str, int]:
        """Frames other servers sent that were not valid messages, by reason (running totals)."""
        return {}

    def add(self, req: Req) -> bool:
        """A request arrived; whether it waits here instead of in the scheduler's queue."""
        return False

    def aborted(self, req: Req) -> None:
        """`req`, found in the scheduler's queues, is being aborted."""

    def discard(self, rid: str, scheduler: Scheduler) -> Req | None:
        """Take out a request held here, to abort it; None if there is none."""
        return None

    def held(self) -> list[Req]:
        return []

    def step(self, scheduler: Scheduler) -> tuple[list[Req], list[Req]]:
        """Once a step: (requests whose KV and first token arrived, requests that ended here)."""
        return [], []

    def prefilled(self, req: Req, scheduler: Scheduler) -> bool:
        """`req` got its first token; whether it now waits here for its decode server."""
        return False


class PrefillSide(NoExchange):
    def __init__(self, handoff: PrefillHandoff):
        self.handoff = handoff

    sockets = property(lambda self: self.handoff.sockets)
    busy = property(lambda self: self.handoff.busy)
    pending = property(lambda self: bool(self.handoff.pending))

    def rejected(self) -> dict[str, int]:
        return dict(self.handoff.rejected.counts)

    def add(self, req: Req) -> bool:
        if req.bootstrap:
            self.handoff.expect(req.bootstrap.room)
        return False

    def aborted(self, req: Req) -> None:
        if req.bootstrap:
            self.handoff.aborted(req.bootstrap.room)

    def discard(self, rid: str, scheduler: Scheduler) -> Req | None:
        return self.handoff.discard(rid)

    def held(self) -> list[Req]:
        return self.handoff.requests

    def step(self, scheduler: Scheduler) -> tuple[list[Req], list[Req]]:
        """Answer claims, finish the requests whose KV left (or failed to), and fail those whose
        decode server has gone before their prompt runs on."""
        done = self.handoff.poll()
        for req in done:
            if scheduler.tracer:
                scheduler.tracer.kv_sent(req)
            if req.error:
                scheduler.drop(req)
            else:
                scheduler.kv.release(req, cache=True)
                scheduler.finish(req, req.finish_reason or FinishReason.LENGTH)  # its one token
        orphans = self.handoff.take_orphans() if self.handoff.orphans else {}
        for queue in (scheduler.waiting, scheduler.running) if orphans else ():
            for req in [r for r in queue if r.bootstrap and r.bootstrap.room in orphans]:
                queue.remove(req)
                req.error = f"the KV of room {req.bootstrap.room} was not handed over: {orphans[req.bootstrap.room]}"
                scheduler.drop(req)
                done.append(req)
        return [], done

    def prefilled(self, req: Req, scheduler: Scheduler) -> bool:
        if req.bootstrap is None:
            return False
        scheduler.running.remove(req)
        if scheduler.tracer:  # first: hand_off starts the transfer at once when the claim came already
            scheduler.tracer.handed_off(req)
        self.handoff.hand_off(req)
        return True


class DecodeSide(NoExchange):
    def __init__(self, intake: DecodeIntake):
        self.intake = intake
        self.receiving: deque[Req] = deque()  # waiting for pages to claim their KV into

    sockets = property(lambda self: self.intake.sockets)
    busy = property(lambda self: self.intake.busy)
    pending = property(lambda self: bool(self.receiving or self.intake.pending))

    def rejected(self) -> dict[str, int]:
        return dict(self.intake.rejected.counts)

    def add(self, req: Req) -> bool:
        if req.bootstrap:
            self.receiving.append(req)
        return req.bootstrap is not None

    def discard(self, rid: str, scheduler: Scheduler) -> Req | None:
        req = next((r for r in self.receiving if r.rid == rid), None)
        if req is not None:
            self.receiving.remove(req)
            return req
        return self.intake.discard(rid, detach=scheduler.kv.detach)

    def held(self) -> list[Req]:
        return [*self.receiving, *self.intake.requests]

    def step(self, scheduler: Scheduler) -> tuple[list[Req], list[Req]]:
        """Claim KV for the requests there are pages for, and take in those whose KV came."""
        kv, tracer = scheduler.kv, scheduler.tracer
        while self.receiving and kv.admit_external(self.receiving[0], len(self.receiving[0].prompt_ids)) is not None:
            req = self.receiving.popleft()
            self.intake.claim(req)
            if tracer:
                tracer.kv_claimed(req)
        polled = self.intake.poll()
        for req in polled:
            if req.error:
                scheduler.drop(req)
                continue
            req.admit_time = req.first_token_time = time.perf_counter()
            req.cached_tokens = 0
            req.finish_reason, req.matched_stop = scheduler.stops.check(req.sampling, req.output_ids, req.seq_len)
            if tracer:
                tracer.kv_arrived(req)
        while self.intake.released:  # pages of aborted requests that no write can reach now
            kv.free(self.intake.released.pop())
        return [req for req in polled if not req.error], [req for req in polled if req.error]
