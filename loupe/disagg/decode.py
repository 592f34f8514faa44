"""The decode server's side of disaggregation: claim each request's KV, fill its pages.

A request with bootstrap fields does not run its prompt here. The scheduler reserves pages
for the prompt (`KVManager.admit_external`), and this intake sends a `wire.Claim` for its
room to the prefill server's bootstrap port, over one authenticated link per prefill server
(channel.Link). With `tcp` it writes the K and V that come back into those pages; with `nixl`
the prefill server writes them there itself, and the request's KV has arrived once both
NIXL's notification and the prefill server's `KVReady` have come. It then tells the prefill
server it has the KV (`Received`), and with the first token the prefill server sampled the
request joins the running batch as a decode; nothing waits for the network meanwhile.

A request fails, its pages freed, when its prefill server refuses it (the error is worded
here from the refusal's code: a peer's text is never passed on), when the link to that server
fails (refused, no handshake, dropped: known within seconds from the link's monitor and
heartbeats; every request on the link fails at once), or when its KV has not come within the
timeout. A link without requests for `IDLE_CLOSE_S` is closed.

An aborted request whose KV NIXL may still be writing keeps its pages out of the pool
(`KVManager.detach`) until the prefill server answers, the link fails, or the timeout passes.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
import zmq

from loupe.core import KVLayout
from loupe.disagg import channel, wire
from loupe.disagg.nixl import NixlKV
from loupe.disagg.prefill import page_slots
from loupe.model.attention import KVCache

logger = logging.getLogger(__name__)

IDLE_CLOSE_S = 30.0


def _server(req) -> tuple[str, int]:
    """The prefill server `req`'s KV comes from: its link's key."""
    return req.bootstrap.host, req.bootstrap.port


class DecodeIntake:
    def __init__(self, kv: KVCache, layout: KVLayout, timeout_s: float, backend: str = "tcp",
                 secret: str | None = None):
        self.kv, self.layout, self.timeout_s, self.backend = kv, layout, timeout_s, backend
        self.keys = channel.Keys.from_secret(secret)
        self.max_frame = max(kv.k.nbytes, wire.MAX_HEADER)  # a request's K (or V) fits the whole cache at most
        self.token_bytes = kv.k[:, 0].nbytes  # one token's K (or V), all layers
        self.nixl = NixlKV(kv, layout.page_size, "decode") if backend == "nixl" else None
        self.links: dict[tuple[str, int], channel.Link] = {}  # one per prefill server
        self.claimed: dict[int, tuple[object, float]] = {}  # room -> (req, since)
        self.headers: dict[int, wire.KVReady] = {}  # nixl: rooms whose KVReady came before the data
        self.written: set[int] = set()  # nixl: rooms whose data came before the KVReady
        self.being_written: set[int] = set()  # nixl: rooms the prefill server is writing now
        self.cancelled: dict[int, tuple[object, tuple[str, int], float]] = {}  # nixl: room -> (held pages, link, since)
        self.released: list = []  # held pages no write can reach any more, for the scheduler to free
        self.rejected = channel.Rejections("bootstrap link to a prefill server")  # bad frames, by reason

    def claim(self, req) -> None:
        """Ask `req`'s prefill server for its KV; `req` holds pages for its prompt already."""
        key, room = _server(req), req.bootstrap.room
        if key not in self.links:
            self.links[key] = channel.Link(self.keys, *key, self.max_frame)
        target = self.nixl.target(req.kv.pages) if self.nixl else None
        self.claimed[room] = (req, time.monotonic())
        self.links[key].send(wire.Claim(room, len(req.prompt_ids), self.layout, self.backend, target))

    def poll(self) -> list:
        """The requests whose KV arrived, their first token appended, or that failed (`error`)."""
        done = []
        for key, link in list(self.links.items()):
            failure = link.check()
            self._receive(link, done)
            if failure:
                self._link_failed(key, failure, done)
        if self.nixl:
            for room in self.nixl.arrived_rooms():
                if room in self.claimed:
                    self.written.add(room)
                else:
                    self._release(room)  # its pages may be reused now
            for room in self.written & self.headers.keys():
                header = self.headers[room]  # the write took header.seconds, as the prefill server timed it
                self._arrived(self._unclaim(room), header, time.perf_counter_ns() - int(header.seconds * 1e9), done)
        self._expire(done)
        return done

    def discard(self, rid: str, detach):
        """Stop waiting for the request `rid` (aborted); the request, or None. With NIXL, its
        pages may still be written: `detach(req)` takes them from it, and they are kept until
        that cannot happen (then in `released`)."""
        for room, (req, _) in list(self.claimed.items()):
            if req.rid == rid:
                self._unclaim(room)
                key = _server(req)
                if self.nixl and key in self.links:
                    self.cancelled[room] = (detach(req), key, time.monotonic())
                    self.links[key].send(wire.Cancel(room))
                return req
        return None

    @property
    def requests(self) -> list:
        return [req for req, _ in self.claimed.values()]

    @property
    def pending(self) -> int:
        return len(self.claimed) + len(self.cancelled)

    @property
    def busy(self) -> bool:
        """Whether a NIXL write into this server is under way: its arrival wakes no socket, and
        over UCX's TCP transport it completes only as this side makes progress (each poll
        does). While a prompt still runs on the prefill server, its socket wakes us."""
        return bool(self.nixl and (self.being_written or self.cancelled))

    @property
    def sockets(self) -> list:
        return [sock for link in self.links.values() for sock in (link.sock, link.monitor)]

    # ---- messages --------------------------------------------------------------------------------

    def _receive(self, link: channel.Link, done: list) -> None:
        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                message, raw = wire.decode(frames)
            except wire.BadMessage as e:
                self.rejected.add(link.address, e.reason, str(e))
                continue
            if isinstance(message, wire.KVReady):
                self._on_kv(link, message, raw, done)
            elif isinstance(message, wire.Refused):
                self._on_refused(link, message, done)
            elif isinstance(message, wire.Writing):
                if self.nixl and message.room in self.claimed:
                    self.being_written.add(message.room)
            elif not isinstance(message, wire.Ping):
                self.rejected.add(link.address, "malformed",
                                  f"a {type(message).__name__} message, which only prefill servers get")

    def _on_kv(self, link: channel.Link, ready: wire.KVReady, raw: list, done: list) -> None:
        room = ready.room
        if room not in self.claimed:  # failed already (timed out), or aborted
            self._release(room)  # NIXL's write has completed: its pages may be reused
            link.send(wire.Received(room, ok=False))
            return
        req = self.claimed[room][0]
        n = len(req.prompt_ids)
        expected_raw = 0 if self.nixl else 2
        if ready.num_tokens != n or len(raw) != expected_raw or any(len(f) != n * self.token_bytes for f in raw):
            self.rejected.add(link.address, "malformed", f"KV for room {room} of the wrong size")
            link.send(wire.Received(room, ok=False))
            self._fail(self._unclaim(room), f"the prefill server at {link.address} sent KV of the wrong size", done)
        elif self.nixl:
            self.headers[room] = ready
        else:
            start = time.perf_counter_ns()
            self._fill(self._unclaim(room), n, raw[0].buffer, raw[1].buffer)
            self._arrived(req, ready, start, done)

    def _on_refused(self, link: channel.Link, r: wire.Refused, done: list) -> None:
        """Fail the request the prefill server refused, with an error worded here from the code."""
        self._release(r.room)
        if r.room not in self.claimed:
            return
        req = self._unclaim(r.room)
        where = f"the prefill server at {link.address}"
        self._fail(req, {
            "backend": f"{where} moves KV by {r.backend} and this decode server by {self.backend}: give both the "
                       "same --disaggregation-transfer-backend",
            "layout": f"{where} has KV layout {r.layout} and this decode server {self.layout}: both must serve the "
                      "same model with the same --page-size and --dtype",
            "num_tokens": f"{where} has {r.num_tokens} prompt tokens for room {r.room}, this server "
                          f"{len(req.prompt_ids)}: the two were not sent the same request",
            "unknown_room": f"{where} has no request for room {r.room} (did the router send it there?)",
            "expired": f"{where} did not run the prompt of room {r.room} in time",
            "failed": f"{where} could not serve room {r.room}: its request failed or was aborted there",
            "transfer_failed": f"the transfer of room {r.room}'s KV from {where} failed",
        }[r.code], done)

    # ---- arrivals and failures -------------------------------------------------------------------

    def _arrived(self, req, header: wire.KVReady, start: int, done: list) -> None:
        """`req`'s KV is in: it takes its first token, and the prefill server hears that it may
        let the KV go."""
        req.output_ids.append(header.first_token)
        if req.sampling.logprobs:
            if header.first_logprob is None:
                req.error = "the prefill server sent no logprobs for the first token"
            else:
                req.output_logprobs.append(header.first_logprob)
        req.kv_transfer = (start, time.perf_counter_ns())
        req.kv_bytes = header.num_bytes or req.kv_bytes
        if _server(req) in self.links:
            self.links[_server(req)].send(wire.Received(req.bootstrap.room, ok=True))
        done.append(req)

    def _fill(self, req, num_tokens: int, k: memoryview, v: memoryview) -> None:
        slots = page_slots(req.kv.pages, self.layout.page_size, num_tokens).to(self.kv.k.device)
        for cache, data in ((self.kv.k, k), (self.kv.v, v)):
            shape = (cache.shape[0], num_tokens, *cache.shape[2:])
            with warnings.catch_warnings():  # the frame is read-only, and only read here
                warnings.simplefilter("ignore", UserWarning)
                values = torch.frombuffer(data, dtype=torch.uint8)
            cache[:, slots] = values.view(cache.dtype).view(shape).to(cache.device)
        req.kv_bytes = len(k) + len(v)

    def _unclaim(self, room: int):
        """The request of a room that no longer waits, taken out with all NIXL's side knew of it."""
        self.headers.pop(room, None)
        self.written.discard(room)
        self.being_written.discard(room)
        return self.claimed.pop(room)[0]

    def _release(self, room: int) -> None:
        """Hand the pages kept for an aborted request's room, if any, to `released`: no write can reach them now."""
        if room in self.cancelled:
            self.released.append(self.cancelled.pop(room)[0])

    def _link_failed(self, key: tuple[str, int], failure: str, done: list) -> None:
        """The link to one prefill server has failed: every request on it fails now."""
        for room, (req, _) in list(self.claimed.items()):
            if _server(req) == key:
                self._fail(self._unclaim(room), failure, done)
        for room, (_, link_key, _) in list(self.cancelled.items()):
            if link_key == key:  # a dead or refusing server writes nothing more
                self._release(room)
        self.links.pop(key).close()

    def _fail(self, req, cause: str, done: list) -> None:
        room = req.bootstrap.room
        req.error = f"no KV for room {room}: {cause}"
        logger.warning("KV transfer failed: room %d, prefill server %s:%d: %s", room, req.bootstrap.host,
                       req.bootstrap.port, cause)
        done.append(req)

    def _expire(self, done: list) -> None:
        now = time.monotonic()
        for room, (_, since) in list(self.claimed.items()):
            if now - since > self.timeout_s:
                self._fail(self._unclaim(room), f"it did not come within {self.timeout_s:g} s", done)
        for room, (_, _, since) in list(self.cancelled.items()):
            if now - since > self.timeout_s:
                self._release(room)
        busy = {_server(req) for req, _ in self.claimed.values()} | {key for _, key, _ in self.cancelled.values()}
        for key, link in list(self.links.items()):
            if key in busy:
                link.last_busy = now
            elif now - link.last_busy > IDLE_CLOSE_S:
                self.links.pop(key).close()

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
