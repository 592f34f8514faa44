"""Messages between loupe's processes, grouped by receiver, and the ZMQ sockets that carry them.

    HTTP + tokenizer manager --TokenizedRequest/AbortRequest--> scheduler
    scheduler --TokenBatch--> detokenizer --TextBatch--> tokenizer manager
    scheduler --SchedulerStats--> tokenizer manager (same socket as the text)
    every serving process --SpanBatch--> span exporter --ExporterStats--> tokenizer manager
    HTTP process --MetricsSnapshot--> metrics exporter --MetricsExported--> tokenizer manager

With --dp-size N a DP controller binds the scheduler's endpoint instead and forwards each
request to one of N schedulers (`Endpoints.replica`), which also send it their stats.

Messages are plain dataclasses of builtin types and loupe.core types, pickled: nothing from
torch, transformers or OpenTelemetry crosses a process boundary. Pickle is safe here only
because every socket is `ipc://` in a folder only this server's user can enter (0700, made
by `Endpoints.create`); nothing another machine can reach is ever unpickled. The two servers
of a prefill/decode pair talk over TCP in loupe.disagg.wire's checked format instead.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from loupe.core import FinishReason, TokenLogprob, TraceContext

# ---- to the scheduler (TokenizedRequest is in loupe.core) ---------------------------------------


@dataclass
class AbortRequest:
    rid: str


# ---- to the detokenizer, then on to the tokenizer manager --------------------------------------


@dataclass
class RequestResult:
    """How a request ended: on its last output only. The scheduler fills it; the detokenizer
    adds the whole text and its own busy time."""

    finish_reason: FinishReason
    matched_stop: int | str | None = None
    error: str | None = None  # why the request failed (its KV never came, say)
    error_code: str = "kv_transfer_failed"  # or "engine_unavailable": a serving process died
    prefill_seconds: float = 0.0  # admission to first token
    decode_seconds: float = 0.0  # first token to the end
    kv_bytes: int = 0  # KV sent to (prefill server) or received from (decode server) the other server
    kv_seconds: float = 0.0  # how long that took
    events: list = field(default_factory=list)  # (name, epoch ns, attributes) for the root span
    text: str | None = None  # the whole final text (detokenizer)
    detokenize_seconds: float | None = None  # the detokenizer's busy time for this request


@dataclass
class RequestOutput:
    """What one request gained in one scheduler step, and on its last step how it ended
    (`result`). The scheduler fills the tokens; the detokenizer adds the text and passes the
    same object on."""

    rid: str
    token_ids: list[int]  # new since the previous output
    logprobs: list[TokenLogprob] | None = None  # of `token_ids`, when the request asked for them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_seconds: float | None = None  # set on the first output: time from arrival to admission
    stop: list[str] | None = None  # the request's stop strings, on the first output
    trace: TraceContext | None = None  # on the first output of a traced request
    result: RequestResult | None = None  # on the last output; None while the request runs
    text_delta: str = ""  # new text since the previous output of this request (detokenizer)
    token_texts: dict[int, str] | None = None  # with `logprobs`: the text of each token id in them, alone


@dataclass
class TokenBatch:
    outputs: list[RequestOutput]


# ---- to the tokenizer manager -------------------------------------------------------------------


@dataclass
class TextBatch:
    outputs: list[RequestOutput]


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_used_tokens: int
    kv_total_tokens: int
    num_received: int = 0  # requests received, ever (the DP controller counts those in transit)
    dp_rank: int = 0
    kv_cached_tokens: int = 0  # evictable prefix-cache pages, in tokens (neither free nor held)
    kv_rejected: dict = field(default_factory=dict)  # bad frames from other servers, by reason (running totals)


@dataclass
class ExporterStats:
    exported: int
    dropped: int
    failed: int
    kept: dict = field(default_factory=dict)  # tail keeping: traces kept, by reason ("error", "slow")
    discarded: dict = field(default_factory=dict)  # and discarded ("ok", "no_room", "expired")
    pid: int = 0  # the exporter's: running totals start again with a restarted one
    queued: int = 0  # spans waiting now: queued for export, or held for a tail verdict


@dataclass
class MetricsExported:
    """Whether the metrics exporter's export of a snapshot succeeded."""

    ok: bool
    superseded: int = 0  # older snapshots that waited with it, not sent: it carries their totals


# ---- to the span exporter ---------------------------------------------------------------------


@dataclass
class SpanBatch:
    """Finished spans of one process (tracing.recorder's SpanRecord and Fanout)."""

    offset_ns: int  # add to the perf_counter_ns() times to get epoch ns
    spans: list
    fanouts: list
    dropped: int  # spans this process had to drop since its last batch
    undecided: set = field(default_factory=set)  # trace ids whose spans wait for a verdict
    verdicts: list = field(default_factory=list)  # (trace id, why kept or None): tail keeping's


# ---- to the metrics exporter --------------------------------------------------------------------

# Snapshots that may wait for a busy metrics exporter at each end of its socket (a few more fit
# in the kernel's buffer between); the HTTP process drops the rest.
METRICS_QUEUE = 1


@dataclass
class MetricFamily:
    """One metric family as prometheus_client collects it, under the name, unit and attribute
    keys it has over OTLP."""

    name: str
    kind: str  # prometheus_client's type: "counter", "gauge", "histogram"...
    unit: str  # UCUM ("s", "By"), or ""
    description: str
    # (what follows the family's name in the sample's: "", "_total", "_bucket", "_created"...,
    # labels, value, exemplar: (labels, value, unix seconds) or None)
    samples: list


@dataclass
class MetricsSnapshot:
    """The HTTP process's metrics at one moment."""

    time_ns: int  # epoch
    number: int  # snapshots taken before this one
    families: list[MetricFamily]


# ---- where each process listens ------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """Every ZMQ address between one server's processes: sockets in one private folder."""

    folder: str
    dp_size: int = 1

    @classmethod
    def create(cls, dp_size: int) -> Endpoints:
        return cls(tempfile.mkdtemp(prefix="loupe-ipc-"), dp_size)

    def _address(self, name: str) -> str:
        return "ipc://" + os.path.join(self.folder, name)

    def replica(self, dp_rank: int) -> str:
        """Where one replica's driver scheduler takes its requests from."""
        return self.scheduler if self.dp_size == 1 else self._address(f"scheduler-dp{dp_rank}")

    # Where each process reads its messages; the tokenizer manager sends requests to `scheduler`
    # (with --dp-size > 1 the DP controller reads them there, and the replicas' stats at `dp_stats`).
    scheduler = property(lambda self: self._address("scheduler"))
    dp_stats = property(lambda self: self._address("dp-controller-stats"))
    detokenizer = property(lambda self: self._address("detokenizer"))
    manager = property(lambda self: self._address("manager"))
    tracing = property(lambda self: self._address("tracing"))
    metrics = property(lambda self: self._address("metrics"))


def bind(ctx: zmq.Context, kind: int, address: str, queue: int | None = None) -> zmq.Socket:
    """`queue`: how many messages may wait to be read (ZMQ's receive high-water mark; 1000 by default)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if queue is not None:
        sock.setsockopt(zmq.RCVHWM, queue)
    sock.bind(address)
    return sock


def connect(ctx: zmq.Context, kind: int, address: str, queue: int | None = None) -> zmq.Socket:
    """`queue`: how many messages may wait for a slow peer (ZMQ's send high-water mark; 1000 by default)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if queue is not None:
        sock.setsockopt(zmq.SNDHWM, queue)
    sock.connect(address)
    return sock


def encode(message: object) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def send(sock: zmq.Socket, message: object) -> None:
    sock.send(encode(message))


def recv(sock: zmq.Socket, flags: int = 0) -> object:
    return decode(sock.recv(flags))


def decode(frame: bytes) -> object:
    return pickle.loads(frame)


@dataclass
class Dispatch:
    """What a process does with each kind of message it reads: the handler registered for the
    message's type (any other type is a TypeError: a bug between loupe's own processes)."""

    handlers: dict[type, Callable[[Any], Any]]

    def __call__(self, message: object) -> Any:
        handler = self.handlers.get(type(message))
        if handler is None:
            raise TypeError(f"no handler for a {type(message).__name__} message")
        return handler(message)
