"""The prefill server's side of disaggregation: its bootstrap port.

A request that came with bootstrap fields runs its prompt here like any other, samples its
first token, and then waits, pages held, until the decode server given the same room claims
it (`wire.Claim` on the bootstrap port). Its prompt's K and V then move: with `tcp` as two
frames after a `KVReady` with the first token (and its logprobs, if asked); with `nixl`
written straight into the pages the decode server named, the `KVReady` following once the
write has completed. The transfer counts as done only when the decode server says it has the
KV (`Received`); then the scheduler releases the pages (into the prefix cache) and answers.

A claim may come before the prompt has run (the router sends both servers the request at
once): it waits. What fails, and how fast:
- a claim for a room this server never received: refused after `UNKNOWN_ROOM_GRACE_S`;
- a decode server that has gone (its connection dropped: sends to it fail at once; every
  peer this server waits on is pinged each second, and every peer when a connection drops):
  its rooms fail, their pages return, its NIXL metadata is dropped;
- a request nobody claims, or a transfer never acknowledged: failed after the timeout.
Each failure is logged once with the room, the peer and the cause. A frame that is not a
valid message is counted (`rejected`), logged once per peer address, and dropped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch
import zmq

from loupe.core import KVLayout
from loupe.disagg import channel, wire
from loupe.disagg.nixl import NixlKV
from loupe.model.attention import KVCache

logger = logging.getLogger(__name__)

UNKNOWN_ROOM_GRACE_S = 3.0  # a claim may race its request to this server by this much
PING_INTERVAL_S = 1.0
MAX_CLAIM_FRAME = 2 << 20  # bytes: a claim's header and NIXL metadata; a larger frame drops its peer
MAX_ENDED_ROOMS = 4096  # rooms that failed here, remembered to refuse their claims at once


def page_slots(pages: list[int], page_size: int, num_tokens: int) -> torch.Tensor:
    """The KV slots of the first `num_tokens` tokens held in `pages`."""
    offsets = torch.arange(page_size)
    return (torch.tensor(pages, dtype=torch.int64)[:, None] * page_size + offsets).flatten()[:num_tokens]


class PrefillHandoff:
    def __init__(self, host: str, port: int, kv: KVCache, layout: KVLayout, timeout_s: float,
                 backend: str = "tcp", secret: str | None = None):
        self.sock = channel.server_socket(channel.Keys.from_secret(secret), host, port, MAX_CLAIM_FRAME)
        self.monitor = channel.ServerMonitor(self.sock)
        self.kv, self.layout, self.timeout_s, self.backend = kv, layout, timeout_s, backend
        self.nixl = NixlKV(kv, layout.page_size, "prefill") if backend == "nixl" else None
        self.expected: set[int] = set()  # rooms of requests received, not yet prefilled
        self.ready: dict[int, tuple[object, float]] = {}  # room -> (req, since): prefilled, unclaimed
        self.claims: dict[int, tuple[bytes, wire.Claim, float]] = {}  # room -> claim made before that
        self.writing: dict[int, tuple[bytes, object]] = {}  # nixl: room -> (decode server, req)
        self.sent: dict[int, tuple[bytes, object, int, float]] = {}  # room -> (peer, req, start ns, since)
        self.ended: OrderedDict[int, str] = OrderedDict()  # room -> why it failed here, for late claims
        self.peers: dict[bytes, str] = {}  # identity -> address, of decode servers that spoke
        self.agents: dict[bytes, str] = {}  # identity -> its NIXL agent
        self.rejected = self.monitor.rejected  # bad frames and failed handshakes, by reason
        self.gone: set[bytes] = set()  # peers found gone during this poll
        self.orphans: dict[int, str] = {}  # room -> why: its decode server went away before its prompt ran
        self.last_ping = 0.0
        self.done: list = []  # handed over, or failed: for the scheduler to release and answer

    # ---- the scheduler's calls -------------------------------------------------------------------

    def expect(self, room: int) -> None:
        """A request for `room` has come to this server: a claim for it is worth waiting for."""
        self.expected.add(room)
        self.ended.pop(room, None)

    def hand_off(self, req) -> None:
        """`req` has its first token: hold its pages for the decode server's claim."""
        room = req.bootstrap.room
        self.expected.discard(room)
        if room in self.ended:  # its decode server went away meanwhile
            self._fail(req, self.ended.pop(room), None)
        elif room in self.claims:
            identity, claim, _ = self.claims.pop(room)
            self._serve(identity, claim, req)
        else:
            self.ready[room] = (req, time.monotonic())

    def take_orphans(self) -> dict[int, str]:
        """Rooms whose prompts need not run any more (their decode server has gone), with why."""
        orphans, self.orphans = self.orphans, {}
        self.expected -= orphans.keys()
        return orphans

    def aborted(self, room: int) -> None:
        """The request of `room` ended here before its hand-off: refuse its claim."""
        self.expected.discard(room)
        self._remember_end(room, "its request ended on the prefill server")
        if room in self.claims:
            self._send(self.claims.pop(room)[0], wire.Refused(room, "failed"))

    def poll(self) -> list:
        """Answer the messages that came; the requests whose KV left (or that failed) since."""
        self.monitor.read()
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._handle(frames[0].bytes, frames[1:])
        if self.nixl:
            self._finish_writes()
        now = time.monotonic()
        if self.monitor.peer_left:  # someone left: find out who, and forget them
            self.monitor.peer_left = False
            self._ping(set(self.peers))
        if now - self.last_ping > PING_INTERVAL_S:  # the peers this server waits on
            self.last_ping = now
            self._ping({i for i, _, _ in self.claims.values()} | {i for i, _ in self.writing.values()} |
                       {i for i, _, _, _ in self.sent.values()})
        self._expire(now)
        while self.gone:
            self._peer_gone(self.gone.pop())
        done, self.done = self.done, []
        return done

    def discard(self, rid: str):
        """Stop holding the request `rid` (aborted); the request, or None. (One being sent to its
        decode server finishes that first.)"""
        for room, (req, _) in list(self.ready.items()):
            if req.rid == rid:
                del self.ready[room]
                self._remember_end(room, "its request ended on the prefill server")
                return req
        return None

    @property
    def requests(self) -> list:
        return ([req for req, _ in self.ready.values()] + [req for _, req in self.writing.values()] +
                [req for _, req, _, _ in self.sent.values()])

    @property
    def pending(self) -> int:
        return len(self.ready) + len(self.claims) + len(self.writing) + len(self.sent)

    @property
    def busy(self) -> bool:
        """Whether a NIXL write is under way: its end wakes no socket, so poll for it."""
        return bool(self.writing)

    @property
    def sockets(self) -> list:
        return [self.sock, self.monitor.monitor]

    # ---- messages --------------------------------------------------------------------------------

    def _handle(self, identity: bytes, frames: list) -> None:
        address = channel.peer_ip(frames[0]) if frames else "an unknown address"
        try:
            message, raw = wire.decode(frames)
        except wire.BadMessage as e:
            self.rejected.add(address, e.reason, str(e))
            return
        self.peers[identity] = address
        if isinstance(message, wire.Claim):
            self._on_claim(identity, message)
        elif isinstance(message, wire.Received):
            self._on_received(identity, message)
        elif isinstance(message, wire.Cancel):
            self._on_cancel(identity, message.room)
        else:
            self.rejected.add(address, "malformed",
                              f"a {type(message).__name__} message, which only decode servers get")

    def _on_claim(self, identity: bytes, claim: wire.Claim) -> None:
        room = claim.room
        if claim.backend != self.backend:  # refused with this server's own values
            self._send(identity, wire.Refused(room, "backend", backend=self.backend))
        elif claim.layout != self.layout:
            self._send(identity, wire.Refused(room, "layout", layout=self.layout))
        elif claim.backend == "nixl" and claim.target is None:
            self._send(identity, wire.Refused(room, "backend", backend=self.backend))
        elif room in self.ready:
            self._serve(identity, claim, self.ready.pop(room)[0])
        elif room in self.ended or room in self.claims or room in self.writing or room in self.sent:
            self._send(identity, wire.Refused(room, "failed"))  # it failed here, or a second claim for one room
        else:
            self.claims[room] = (identity, claim, time.monotonic())

    def _on_received(self, identity: bytes, received: wire.Received) -> None:
        room = received.room
        if self.sent.get(room, (None,))[0] != identity:
            return  # not this peer's room, or ended already (timed out)
        if not received.ok:
            self._unconfirmed(room, "the decode server no longer wanted it (its request ended there)", identity)
            return
        _, req, start, _ = self.sent.pop(room)
        req.kv_transfer = (start, time.perf_counter_ns())
        self.done.append(req)

    def _on_cancel(self, identity: bytes, room: int) -> None:
        """The decode server's request ended: its pages stay reserved there until this answers."""
        if room in self.claims and self.claims[room][0] == identity:
            self._drop_claim(room, "the decode server cancelled it (its request ended there)")
            self._send(identity, wire.Refused(room, "failed"))
        # One being written or sent finishes; the decode server then answers Received(ok=False).

    # ---- sending KV ------------------------------------------------------------------------------

    def _serve(self, identity: bytes, claim: wire.Claim, req) -> None:
        n, room = len(req.prompt_ids), claim.room
        if claim.num_tokens != n:
            self._refuse(identity, req, f"the decode server holds {claim.num_tokens} tokens for it; the prompt has {n}",
                         "num_tokens", num_tokens=n)
            return
        num_pages = -(-n // self.layout.page_size)
        if not self.nixl:
            start = time.perf_counter_ns()
            slots = page_slots(req.kv.pages, self.layout.page_size, n).to(self.kv.k.device)
            k, v = (cache[:, slots].cpu().view(torch.uint8).numpy() for cache in (self.kv.k, self.kv.v))
            self._send_kv(identity, req, start, k.nbytes + v.nbytes, 0.0, k, v)
        elif len(claim.target.pages) < num_pages:
            self._refuse(identity, req, "the decode server named too few pages for it", "num_tokens", num_tokens=n)
        else:
            try:
                self.nixl.write(room, req.kv.pages[:num_pages], claim.target)
            except RuntimeError as e:
                self._refuse(identity, req, str(e), "transfer_failed")
                return
            self.agents[identity] = claim.target.agent
            self.writing[room] = (identity, req)
            self._send(identity, wire.Writing(room))

    def _finish_writes(self) -> None:
        for room, ok, start in self.nixl.finished_writes():
            identity, req = self.writing.pop(room)
            if not ok:
                self._refuse(identity, req, "the NIXL write to the decode server failed", "transfer_failed")
                continue
            num_bytes = 2 * self.layout.num_layers * -(-len(req.prompt_ids) // self.layout.page_size) * self.nixl.page_bytes
            self._send_kv(identity, req, start, num_bytes, (time.perf_counter_ns() - start) / 1e9)

    def _send_kv(self, identity: bytes, req, start: int, num_bytes: int, seconds: float, *raw) -> None:
        """Send `req`'s first token (and its logprobs, if asked: the decode server reports them);
        with tcp its K and V (`raw`) follow. Its pages are held until the decode server confirms."""
        ready = wire.KVReady(req.bootstrap.room, req.output_ids[0], len(req.prompt_ids), num_bytes, seconds,
                             req.output_logprobs[0] if req.output_logprobs else None)
        if self._send(identity, ready, *raw):
            req.kv_bytes = num_bytes
            self.sent[ready.room] = (identity, req, start, time.monotonic())
        else:
            self._fail(req, "the decode server has gone", identity)

    def _send(self, identity: bytes, message: wire.Message, *raw) -> bool:
        """Whether `message` is on its way: False if its peer has gone (or stopped reading)."""
        try:
            self.sock.send_multipart([identity, *wire.encode(message, *raw)], zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self.gone.add(identity)  # failed at the end of this poll, once its requests have said why
            return False

    # ---- failures --------------------------------------------------------------------------------

    def _ping(self, identities: set[bytes]) -> None:
        """Sends to a peer whose connection has dropped fail at once: it is then gone."""
        for identity in identities:
            self._send(identity, wire.Ping())

    def _peer_gone(self, identity: bytes) -> None:
        """A decode server's connection has dropped: fail everything that waits on it."""
        address = self.peers.pop(identity, "an unknown address")
        for room, (peer, _, _) in list(self.claims.items()):
            if peer == identity:
                self._drop_claim(room, f"the decode server at {address} went away")
                logger.warning("KV transfer failed: room %d, decode server %s: it went away before the prompt ran",
                               room, address)
        for room, (peer, _, _, _) in list(self.sent.items()):
            if peer == identity:
                self._unconfirmed(room, f"the decode server at {address} went away before confirming it", None)
        # NIXL writes to it end by themselves, failed (finished_writes).
        agent = self.agents.pop(identity, None)
        if agent and self.nixl and agent not in self.agents.values():
            self.nixl.forget(agent)

    def _refuse(self, identity: bytes, req, cause: str, code: str, **details) -> None:
        """Refuse the decode server's claim for `req` (with `code` and its details), which fails."""
        self._send(identity, wire.Refused(req.bootstrap.room, code, **details))
        self._fail(req, cause, identity)

    def _unconfirmed(self, room: int, cause: str, identity: bytes | None) -> None:
        """KV sent for `room` that the decode server will not confirm: it did not move."""
        req = self.sent.pop(room)[1]
        req.kv_bytes = 0
        self._fail(req, cause, identity)

    def _fail(self, req, cause: str, identity: bytes | None) -> None:
        room = req.bootstrap.room
        address = self.peers.get(identity, "an unknown address") if identity else "none"
        req.error = f"the KV of room {room} was not handed over: {cause}"
        logger.warning("KV transfer failed: room %d, decode server %s: %s", room, address, cause)
        self._remember_end(room, cause)
        self.done.append(req)

    def _drop_claim(self, room: int, cause: str) -> None:
        """A claim that will not be served: remember why, and if its prompt has not run yet, the
        scheduler stops running it."""
        del self.claims[room]
        self._remember_end(room, cause)
        if room in self.expected:
            self.orphans[room] = cause

    def _remember_end(self, room: int, cause: str) -> None:
        self.ended[room] = cause
        while len(self.ended) > MAX_ENDED_ROOMS:
            self.ended.popitem(last=False)

    def _expire(self, now: float) -> None:
        for room, (req, since) in list(self.ready.items()):
            if now - since > self.timeout_s:
                del self.ready[room]
                self._fail(req, f"no decode server claimed it within {self.timeout_s:g} s", None)
        for room, (identity, _, since) in list(self.claims.items()):
            known = room in self.expected
            if now - since > (self.timeout_s if known else UNKNOWN_ROOM_GRACE_S):
                del self.claims[room]
                self._send(identity, wire.Refused(room, "expired" if known else "unknown_room"))
        for room, (identity, _, _, since) in list(self.sent.items()):
            if now - since > self.timeout_s:
                self._unconfirmed(room, f"the decode server did not confirm it within {self.timeout_s:g} s", identity)

    def close(self) -> None:
        self.monitor.close()  # and the socket
