"""The decode server's side of disaggregation: claim each request's KV, fill its pages.

A request with bootstrap fields does not run its prompt here. The scheduler reserves pages
for the prompt (`KVManager.admit_external`), and this intake sends a `KVClaim` for its room
to the prefill server's bootstrap port, then writes the K and V that come back into those
pages. With the first token the prefill server sampled, the request then joins the running
batch as a decode; nothing waits for the network meanwhile. A request whose KV does not come
within the timeout, or whose prefill server answers with an error, fails.
"""

from __future__ import annotations

import time
import warnings

import torch
import zmq

from loupe import ipc
from loupe.core import KVLayout
from loupe.disagg.prefill import page_slots
from loupe.runner.attention import KVCache


class DecodeIntake:
    def __init__(self, kv: KVCache, layout: KVLayout, timeout_s: float):
        self.kv, self.layout, self.timeout_s = kv, layout, timeout_s
        self.sockets: dict[tuple[str, int], zmq.Socket] = {}  # one per prefill server
        self.claimed: dict[int, tuple[object, float]] = {}  # room -> (req, since)

    def claim(self, req) -> None:
        """Ask `req`'s prefill server for its KV; `req` holds pages for its prompt already."""
        b = req.bootstrap
        sock = self.sockets.get((b.host, b.port))
        if sock is None:
            sock = self.sockets[b.host, b.port] = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{b.host}:{b.port}")
        sock.send(ipc.encode(ipc.KVClaim(b.room, len(req.prompt_ids), self.layout)))
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
                req = self.claimed.pop(header.room, (None,))[0]
                if req is None:  # failed already (timed out), or aborted: its pages are gone
                    continue
                if header.error:
                    req.error = header.error
                else:
                    self._fill(req, header.num_tokens, frames[1].buffer, frames[2].buffer)
                    req.output_ids.append(header.first_token)
                    req.kv_transfer = (start, time.perf_counter_ns())
                done.append(req)
        now = time.monotonic()
        for room, (req, since) in list(self.claimed.items()):
            if now - since > self.timeout_s:
                del self.claimed[room]
                req.error = (f"no KV from the prefill server at {req.bootstrap.host}:{req.bootstrap.port} "
                             f"for room {room} within {self.timeout_s:g} s")
                done.append(req)
        return done

    def discard(self, rid: str):
        """Stop waiting for the request `rid` (aborted); the request, or None."""
        for room, (req, _) in list(self.claimed.items()):
            if req.rid == rid:
                del self.claimed[room]
                return req
        return None

    @property
    def requests(self) -> list:
        return [req for req, *_ in self.claimed.values()]

    @property
    def pending(self) -> int:
        return len(self.claimed)

    def _fill(self, req, num_tokens: int, k: memoryview, v: memoryview) -> None:
        slots = page_slots(req.pages, self.layout.page_size, num_tokens).to(self.kv.k.device)
        for cache, data in ((self.kv.k, k), (self.kv.v, v)):
            shape = (cache.shape[0], num_tokens, *cache.shape[2:])
            with warnings.catch_warnings():  # the frame is read-only, and only read here
                warnings.simplefilter("ignore", UserWarning)
                values = torch.frombuffer(data, dtype=torch.uint8)
            cache[:, slots] = values.view(cache.dtype).view(shape).to(cache.device)
        req.kv_bytes = len(k) + len(v)
