"""The bootstrap channel between a pair's servers: authenticated, encrypted ZMQ sockets that
notice a dead or refusing peer within seconds.

Authentication: both servers derive CURVE key pairs (ZMQ's CurveZMQ, Curve25519) from the
shared `--disaggregation-secret`. The decode server must know the prefill server's public key
to open its handshake, and the prefill server must hold the matching secret key to answer it;
both are derived from the secret and never sent, so a peer without it completes no handshake
and receives nothing: not the KV layout, not the backend, no NIXL metadata. Without a secret
both servers use a built-in one, which `ServerArgs` allows only on loopback.

Liveness: ZMTP heartbeats every second drop a silent connection after `HEARTBEAT_TIMEOUT_MS`;
a socket monitor reports connects, handshakes and disconnects, so a refused connection, a
failed handshake and a dead peer are known at once instead of at the request's timeout. A
decode server's socket never reconnects by itself: the first failure ends it, and the next
request opens a new one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from loupe.disagg import wire

logger = logging.getLogger(__name__)

LOOPBACK_SECRET = "loupe: a pair on one machine, no --disaggregation-secret given"
HEARTBEAT_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
HANDSHAKE_MS = 3000  # a peer that has not completed its handshake by then is dropped
CONNECT_TIMEOUT_MS = 3000
MAX_LOGGED_PEERS = 256  # addresses whose bad frames are logged (once each); all are counted
FAULTS = {"malformed": "a malformed frame", "oversized": "an oversized frame",  # by wire.BadMessage.reason
          "version": "a frame of an unknown protocol version or kind",
          "handshake": "no valid handshake (no secret, another --disaggregation-secret, or not a loupe decode server)"}
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


@dataclass(frozen=True)
class Keys:
    """CURVE key pairs (Z85 text) for the prefill server's socket and the decode servers'."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_secret(cls, secret: str | None) -> Keys:
        def pair(role: str) -> tuple[bytes, bytes]:
            private = z85.encode(hashlib.sha256(f"loupe disaggregation v1 {role}\0{secret or LOOPBACK_SECRET}".encode())
                                 .digest())
            return zmq.curve_public(private), private

        return cls(*pair("prefill"), *pair("decode"))


def _common(sock: zmq.Socket, max_frame_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)  # a larger frame drops the connection


def server_socket(keys: Keys, host: str, port: int, max_frame_bytes: int) -> zmq.Socket:
    """The prefill server's bootstrap socket. Sends to a peer that has gone raise EHOSTUNREACH."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    _common(sock, max_frame_bytes)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = keys.server_public, keys.server_secret
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(f"tcp://{host}:{port}")
    return sock


def peer_ip(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "an unknown address"


class Link:
    """A decode server's connection to one prefill server, and what its monitor has told."""

    def __init__(self, keys: Keys, host: str, port: int, max_frame_bytes: int):
        self.address = f"{host}:{port}"
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        _common(self.sock, max_frame_bytes)
        self.sock.setsockopt(zmq.RECONNECT_IVL, -1)  # never reconnect: a failure ends this link
        self.sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
        self.sock.curve_serverkey = keys.server_public
        self.sock.curve_publickey, self.sock.curve_secretkey = keys.client_public, keys.client_secret
        self.monitor = self.sock.get_monitor_socket()
        self.up = False  # handshake done
        self.failure: str | None = None  # why it ended
        self.outbox: list[list] = []  # messages ZMQ had no room for yet (before the connection is made)
        self.blocked_since: float | None = None
        self.last_busy = time.monotonic()  # when a request last waited on it (DecodeIntake closes idle links)
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        try:
            self.sock.connect(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:  # an address ZMQ cannot parse: this link fails, nothing else
            self.failure = f"could not connect to the prefill server at {self.address} ({e.strerror})"

    def send(self, message: wire.Message) -> None:
        self.outbox.append(wire.encode(message))
        self.flush()

    def flush(self) -> None:
        """Send what waits. ZMQ has no room before the connection is made, or just after it
        dropped (the monitor says so next), or while the peer reads nothing: only the last
        fails the link, once nothing has gone for `HANDSHAKE_MS`."""
        while self.outbox and self.failure is None:
            try:
                self.sock.send_multipart(self.outbox[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                now = time.monotonic()
                self.blocked_since = self.blocked_since or now
                if self.up and now - self.blocked_since > HANDSHAKE_MS / 1000:
                    self.failure = f"the prefill server at {self.address} is not reading its bootstrap port"
                return
            self.outbox.pop(0)
            self.blocked_since = None

    def check(self) -> str | None:
        """Read the monitor's news, send what waits; why the link has failed, or None."""
        while self.failure is None and self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up = True
            elif event in HANDSHAKE_FAILURES:
                self.failure = (f"no secure handshake with the prefill server at {self.address}: it is not a loupe "
                                "prefill server, or its --disaggregation-secret differs")
            elif event == zmq.EVENT_DISCONNECTED:
                self.failure = (f"lost the connection to the prefill server at {self.address}" if self.up else
                                f"the prefill server at {self.address} closed the connection before a handshake")
            elif event in (zmq.EVENT_CLOSED, zmq.EVENT_CONNECT_RETRIED) and not self.up:
                self.failure = f"could not connect to the prefill server at {self.address}"
        self.flush()
        return self.failure

    def close(self) -> None:
        self.sock.disable_monitor()  # first: see ServerMonitor.close
        self.monitor.close(0)
        self.sock.close(0)


class Rejections:
    """What peers sent that was refused, counted by reason (`FAULTS`'s keys; /metrics shows the
    counts) and logged once per address and reason."""

    def __init__(self, where: str):
        self.where = where
        self.counts: dict[str, int] = {}
        self.logged: set[tuple[str, str]] = set()

    def add(self, address: str, reason: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if (address, reason) in self.logged or len(self.logged) >= MAX_LOGGED_PEERS:
            return
        self.logged.add((address, reason))
        what = f"{FAULTS[reason]} ({detail[:120]})" if detail else FAULTS[reason]
        logger.warning("%s: refused %s from %s (counted in loupe_disaggregation_rejected_total; logged once per "
                       "address)", self.where, what, address)


class ServerMonitor:
    """The prefill server's view of connections to its bootstrap port: each refused handshake
    (no or another secret, not ZMQ at all) counted and logged once per address, and whether a
    peer has left since the last look."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.monitor = sock.get_monitor_socket()
        self.addresses: dict[int, str] = {}  # fd -> peer address, for connections accepted
        self.previous: tuple[int, int] | None = None  # the last event and its value
        self.rejected = Rejections("bootstrap port")  # failed handshakes here; bad frames too (PrefillHandoff)
        self.peer_left = False

    def read(self) -> None:
        while self.monitor.poll(0):
            message = parse_monitor_message(self.monitor.recv_multipart())
            event, value = message["event"], message["value"]
            if event == zmq.EVENT_ACCEPTED:
                self.addresses[value] = _address_of(value)
            elif event == zmq.EVENT_DISCONNECTED:
                address = self.addresses.pop(value, "an unknown address")
                # libzmq reports a failed handshake just before the same connection's disconnect;
                # a connection closed right after it was accepted never spoke ZMTP at all.
                if self.previous is not None and (self.previous[0] in HANDSHAKE_FAILURES or
                                                  self.previous == (zmq.EVENT_ACCEPTED, value)):
                    self.rejected.add(address, "handshake")
                else:
                    self.peer_left = True
            self.previous = (event, value)

    def close(self) -> None:
        """Close the monitor and then its socket (in that order: a socket closed while its
        monitor runs keeps its connections open)."""
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def _address_of(fd: int) -> str:
    """The peer address of a connection libzmq just accepted (it may be gone already)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:  # a duplicate: closing it leaves libzmq's open
            return s.getpeername()[0]
    except OSError:
        return "an unknown address"
