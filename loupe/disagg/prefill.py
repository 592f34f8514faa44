"""The prefill server's side of disaggregation: its bootstrap endpoint.

A request that came with bootstrap fields runs its prompt here like any other, samples its
first token, and then waits, pages held, until the decode server given the same room claims
it (`KVClaim` on the bootstrap port). Its prompt's K and V then move: with `tcp` as two ZMQ
frames after a `KVHeader` with the first token (and its logprobs, if asked); with `nixl` written straight into the pages
the decode server named, the header following once the write has completed. Then the
scheduler releases its pages (into the prefix cache) and answers it. A claim may come before
the prompt has run (the router sends both servers the request at once): it waits. A request
nobody claims, or a claim for a room that never comes, fails after the timeout instead of
holding pages for ever.
"""

from __future__ import annotations

import time

import torch
import zmq

from loupe import ipc
from loupe.core import KVLayout
from loupe.disagg.nixl import NixlKV
from loupe.runner.attention import KVCache


def page_slots(pages: list[int], page_size: int, num_tokens: int) -> torch.Tensor:
    """The KV slots of the first `num_tokens` tokens held in `pages`."""
    offsets = torch.arange(page_size)
    return (torch.tensor(pages, dtype=torch.int64)[:, None] * page_size + offsets).flatten()[:num_tokens]


def claim_problem(layout: KVLayout, backend: str, claim: ipc.KVClaim) -> str | None:
    """Why this prefill server cannot serve a decode server's claim, naming both sides' values."""
    if claim.backend != backend:
        return (f"the prefill server moves KV by {backend} and the decode server by {claim.backend}: "
                "give both the same --disaggregation-transfer-backend")
    if claim.layout != layout:
        return (f"the prefill server's KV layout is {layout} and the decode server's is {claim.layout}: "
                "both must serve the same model with the same --page-size and --dtype")
    return None


def first_logprob(req):
    """The first token's logprobs, if the request asked (the decode server reports them)."""
    return req.output_logprobs[0] if req.output_logprobs else None


class PrefillHandoff:
    def __init__(self, host: str, port: int, kv: KVCache, layout: KVLayout, timeout_s: float,
                 backend: str = "tcp"):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://{host}:{port}")
        self.kv, self.layout, self.timeout_s, self.backend = kv, layout, timeout_s, backend
        self.nixl = NixlKV(kv, layout.page_size, "prefill") if backend == "nixl" else None
        self.ready: dict[int, tuple[object, float]] = {}  # room -> (req, since): prefilled, unclaimed
        self.claims: dict[int, tuple[bytes, ipc.KVClaim, float]] = {}  # room -> claim made before that
        self.writing: dict[int, tuple[bytes, object]] = {}  # nixl: room -> (decode server, req)
        self.done: list = []  # handed over, or failed: for the scheduler to release and answer

    def hand_off(self, req) -> None:
        """`req` has its first token: hold its pages for the decode server's claim."""
        room = req.bootstrap.room
        if room in self.claims:
            identity, claim, _ = self.claims.pop(room)
            self._send(identity, claim, req)
        else:
            self.ready[room] = (req, time.monotonic())

    def poll(self) -> list:
        """Answer the claims that came; the requests whose KV left (or that failed) since."""
        while True:
            try:
                identity, frame = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            claim = ipc.decode(frame)
            problem = claim_problem(self.layout, self.backend, claim)
            if problem:
                self._reply(identity, ipc.KVHeader(claim.room, error=problem))
            elif claim.room in self.ready:
                self._send(identity, claim, self.ready.pop(claim.room)[0])
            else:
                self.claims[claim.room] = (identity, claim, time.monotonic())
        if self.nixl:
            self._finish_writes()
        self._expire()
        done, self.done = self.done, []
        return done

    def discard(self, rid: str):
        """Stop holding the request `rid` (aborted); the request, or None. (One being written
        to its decode server finishes that first.)"""
        for room, (req, _) in list(self.ready.items()):
            if req.rid == rid:
                del self.ready[room]
                return req
        return None

    @property
    def requests(self) -> list:
        return [req for req, _ in self.ready.values()] + [req for _, req in self.writing.values()]

    @property
    def pending(self) -> int:
        return len(self.ready) + len(self.claims) + len(self.writing)

    @property
    def busy(self) -> bool:
        """Whether a NIXL write is under way: its end wakes no socket, so poll for it."""
        return bool(self.writing)

    def _send(self, identity: bytes, claim: ipc.KVClaim, req) -> None:
        n = len(req.prompt_ids)
        if claim.num_tokens != n:
            req.error = f"the decode server holds {claim.num_tokens} tokens for room {claim.room}; the prompt has {n}"
            self._reply(identity, ipc.KVHeader(claim.room, error=req.error))
        elif self.nixl:
            self.nixl.write(claim.room, req.pages[: -(-n // self.layout.page_size)], claim.target)
            self.writing[claim.room] = (identity, req)
            return
        else:
            start = time.perf_counter_ns()
            slots = page_slots(req.pages, self.layout.page_size, n).to(self.kv.k.device)
            k, v = (cache[:, slots].cpu().view(torch.uint8).numpy() for cache in (self.kv.k, self.kv.v))
            header = ipc.KVHeader(claim.room, req.output_ids[0], n, first_logprob=first_logprob(req))
            self.sock.send_multipart([identity, ipc.encode(header), k, v], copy=False)
            req.kv_bytes, req.kv_transfer = k.nbytes + v.nbytes, (start, time.perf_counter_ns())
        self.done.append(req)

    def _finish_writes(self) -> None:
        for room, ok, start in self.nixl.finished_writes():
            identity, req = self.writing.pop(room)
            if ok:
                end = time.perf_counter_ns()
                pages = -(-len(req.prompt_ids) // self.layout.page_size)
                req.kv_bytes, req.kv_transfer = 2 * self.layout.num_layers * pages * self.nixl.page_bytes, (start, end)
                self._reply(identity, ipc.KVHeader(room, req.output_ids[0], len(req.prompt_ids),
                                                   num_bytes=req.kv_bytes, seconds=(end - start) / 1e9,
                                                   first_logprob=first_logprob(req)))
            else:
                req.error = f"the NIXL write of room {room} to the decode server failed"
                self._reply(identity, ipc.KVHeader(room, error=req.error))
            self.done.append(req)

    def _reply(self, identity: bytes, header: ipc.KVHeader) -> None:
        self.sock.send_multipart([identity, ipc.encode(header)])

    def _expire(self) -> None:
        now = time.monotonic()
        for room, (req, since) in list(self.ready.items()):
            if now - since > self.timeout_s:
                del self.ready[room]
                req.error = f"no decode server claimed room {room} within {self.timeout_s:g} s"
                self.done.append(req)
        for room, (identity, _, since) in list(self.claims.items()):
            if now - since > self.timeout_s:
                del self.claims[room]
                self._reply(identity, ipc.KVHeader(room, error=f"the prefill server has no request for room {room}"))
