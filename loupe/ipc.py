"""Messages between loupe's processes, and the ZMQ sockets that carry them.

    HTTP + tokenizer manager --TokenizedRequest/AbortRequest--> scheduler
    scheduler --TokenBatch--> detokenizer --TextBatch--> tokenizer manager
    scheduler --SchedulerStats--> tokenizer manager (same socket as the text)

With --dp-size N a DP controller binds the scheduler's endpoint instead and forwards each
request to one of N schedulers (scheduler-dp0 ... ), which also send it their stats.

Messages are plain dataclasses of builtin types, pickled: nothing from torch, transformers
or OpenTelemetry crosses a process boundary.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field

import zmq

from loupe.tracing.context import TraceContext


@dataclass
class TokenizedRequest:
    rid: str
    input_ids: list[int]
    sampling: dict  # SamplingParams fields, validated by the tokenizer manager
    trace: TraceContext | None = None  # None when the request is not traced


@dataclass
class AbortRequest:
    rid: str


@dataclass
class RequestOutput:
    """What one request gained in one scheduler step."""

    rid: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_seconds: float | None = None  # set on the first output: time from arrival to admission
    stop: list[str] | None = None  # the request's stop strings, on the first output
    trace: TraceContext | None = None  # on the first output of a traced request
    error: str | None = None  # the scheduler refused the request
    # On the last output:
    prefill_seconds: float = 0.0  # admission to first token
    decode_seconds: float = 0.0  # first token to the end
    events: list = field(default_factory=list)  # (name, epoch ns, attributes) for the root span


@dataclass
class TokenBatch:
    outputs: list[RequestOutput]


@dataclass
class TextOutput:
    rid: str
    text_delta: str  # new text since the previous TextOutput of this request
    token_ids: list[int]
    finish_reason: str | None
    matched_stop: int | str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_seconds: float | None
    error: str | None = None
    text: str | None = None  # the whole final text, on the last output
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    events: list = field(default_factory=list)


@dataclass
class TextBatch:
    outputs: list[TextOutput]


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_used_tokens: int
    kv_total_tokens: int
    num_received: int = 0  # requests received, ever (the DP controller counts those in transit)
    dp_rank: int = 0


@dataclass
class SpanBatch:
    """Finished spans of one process, as tuples (see tracing/recorder.py)."""

    offset_ns: int  # add to the perf_counter_ns() times to get epoch ns
    spans: list[tuple]
    fanouts: list[tuple]
    dropped: int  # spans this process had to drop since its last batch


@dataclass
class ExporterStats:
    exported: int
    dropped: int
    failed: int


def ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="loupe-ipc-")


def endpoint(folder: str, name: str) -> str:
    return "ipc://" + os.path.join(folder, name)


def bind(ctx: zmq.Context, kind: int, address: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    return sock


def connect(ctx: zmq.Context, kind: int, address: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
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
