"""The decode server's side of disaggregation: claim each request's KV, fill its pages.

A request with bootstrap fields does not run its prompt here. The scheduler reserves pages
for the prompt (`KVManager.admit_external`), and this intake sends a `KVClaim` for its room
to the prefill server's bootstrap port. With `tcp` it writes the K and V that come back into
those pages; with `nixl` the prefill server writes them there itself, and the request's KV
has arrived once both NIXL's notification and the prefill server's header have come. With
the first token the prefill server sampled, the request then joins the running batch as a
decode (with its logprobs, when the request asked: the prefill server computed them);
nothing waits for the network meanwhile. A request whose KV does not come within the
timeout, or whose prefill server answers with an error, fails.
"""

from __future__ import annotations

import time
import warnings

import torch
import zmq

from loupe import ipc
from loupe.core import KVLayout
from loupe.disagg.nixl import NixlKV
from loupe.disagg.prefill import page_slots
from loupe.runner.attention import KVCache


class DecodeIntake:
    def __init__(self, kv: KVCache, layout: KVLayout, timeout_s: float, backend: str = "tcp"):
        self.kv, self.layout, self.timeout_s, self.backend = kv, layout, timeout_s, backend
        self.nixl = NixlKV(kv, layout.page_size, "decode") if backend == "nixl" else None
        self.sockets: dict[tuple[str, int], zmq.Socket] = {}  # one per prefill server
        self.claimed: dict[int, tuple[object, float]] = {}  # room -> (req, since)
        self.headers: dict[int, ipc.KVHeader] = {}  # nixl: rooms whose header came before the data
        self.written: set[int] = set()  # nixl: rooms whose data came before the header

    def claim(self, req) -> None:
        """Ask `req`'s prefill server for its KV; `req` holds pages for its prompt already."""
        b = req.bootstrap
        sock = self.sockets.get((b.host, b.port))
        if sock is None:
            sock = self.sockets[b.host, b.port] = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{b.host}:{b.port}")
        target = self.nixl.target(req.pages) if self.nixl else None
        sock.send(ipc.encode(ipc.KVClaim(b.room, len(req.prompt_ids), self.layout, self.backend, target)))
        self.claimed[b.room] = (req, time.monotonic())

    def poll(self) -> list:
        """The requests whose KV arrived, their first token appended, or that failed (`error`)."""
        done = []
        for sock in self.sockets.values():
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                start = time.perf_counter_ns()
                header = ipc.decode(frames[0].buffer)
                if header.room not in self.claimed:  # failed already (timed out), or aborted
                    continue
                if header.error or not self.nixl:
                    req = self.claimed.pop(header.room)[0]
                    if header.error:
                        req.error = header.error
                    else:
                        self._fill(req, header.num_tokens, frames[1].buffer, frames[2].buffer)
                        self._arrived(req, header, start)
                    done.append(req)
                else:
                    self.headers[header.room] = header
        if self.nixl:
            self.written.update(self.nixl.arrived_rooms())
            self.written &= self.claimed.keys()  # a late write for a request that failed meanwhile
            for room in self.written & self.headers.keys():
                self.written.discard(room)
                header = self.headers.pop(room)
                req = self.claimed.pop(room)[0]
                end = time.perf_counter_ns()
                self._arrived(req, header, end - int(header.seconds * 1e9), end)
                done.append(req)
        self._expire(done)
        return done

    def discard(self, rid: str):
        """Stop waiting for the request `rid` (aborted); the request, or None."""
        for room, (req, _) in list(self.claimed.items()):
            if req.rid == rid:
                del self.claimed[room]
                self.headers.pop(room, None)
                return req
        return None

    @property
    def requests(self) -> list:
        return [req for req, _ in self.claimed.values()]

    @property
    def pending(self) -> int:
        return len(self.claimed)

    @property
    def busy(self) -> bool:
        """Whether NIXL data is awaited: its arrival wakes no socket, and over TCP the write
        completes only as this side makes progress (each poll does)."""
        return bool(self.nixl and self.claimed)

    def _arrived(self, req, header: ipc.KVHeader, start: int, end: int | None = None) -> None:
        req.output_ids.append(header.first_token)
        if req.sampling.logprobs:
            if header.first_logprob is None:
                req.error = "the prefill server sent no logprobs for the first token"
            else:
                req.output_logprobs.append(header.first_logprob)
        req.kv_transfer = (start, end or time.perf_counter_ns())
        req.kv_bytes = header.num_bytes or req.kv_bytes

    def _fill(self, req, num_tokens: int, k: memoryview, v: memoryview) -> None:
        slots = page_slots(req.pages, self.layout.page_size, num_tokens).to(self.kv.k.device)
        for cache, data in ((self.kv.k, k), (self.kv.v, v)):
            shape = (cache.shape[0], num_tokens, *cache.shape[2:])
            with warnings.catch_warnings():  # the frame is read-only, and only read here
                warnings.simplefilter("ignore", UserWarning)
                values = torch.frombuffer(data, dtype=torch.uint8)
            cache[:, slots] = values.view(cache.dtype).view(shape).to(cache.device)
        req.kv_bytes = len(k) + len(v)

    def _expire(self, done: list) -> None:
        now = time.monotonic()
        for room, (req, since) in list(self.claimed.items()):
            if now - since > self.timeout_s:
                del self.claimed[room]
                self.headers.pop(room, None)
                req.error = (f"no KV from the prefill server at {req.bootstrap.host}:{req.bootstrap.port} "
                             f"for room {room} within {self.timeout_s:g} s")
                done.append(req)
