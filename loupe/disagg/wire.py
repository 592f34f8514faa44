"""What crosses between the two servers of a prefill/decode pair, and how each frame is checked.

Another machine can reach the bootstrap port, so nothing here builds objects a peer chooses:
every message is a ZMQ multipart message whose first frame is a JSON object (at most
`MAX_HEADER` bytes) with the protocol version `v`, the message `kind` and its fields, each
checked for type and range; raw byte frames follow where a message carries bytes (NIXL's
agent metadata; a request's K and V). A frame that is not a valid message of this version
raises `BadMessage`, which the receiver counts and drops. (Inside one server, between its own
processes, loupe.ipc pickles over `ipc://` sockets in a private folder; none of that is here.)

    decode -> prefill   Claim     send me room R's KV (with nixl: where to write it)
                        Received  room R's KV is in (ok), or was not wanted after all
                        Cancel    I no longer want room R (its request was aborted)
    prefill -> decode   Writing   NIXL is writing room R's KV now (poll, so that it progresses)
                        KVReady   room R's first token; with tcp, K and V follow as two frames
                        Refused   room R cannot be served, and why (a code, typed details)
                        Ping      are you there? (to a peer the prefill server waits on)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from loupe.core import MAX_TOP_LOGPROBS, KVLayout, TokenLogprob

VERSION = 1
MAX_HEADER = 1 << 20  # bytes of the JSON frame (a long prompt's page list)
MAX_METADATA = 1 << 20  # bytes of a NIXL agent's metadata
MAX_ROOM = 1 << 64  # rooms are 0 <= room < 2**64 (SGLang's router draws 63 bits)
MAX_INT = 1 << 63
BACKENDS = ("nixl", "tcp")
DTYPES = ("float32", "float16", "bfloat16")
# Why a prefill server refuses a claim; the decode server words the error itself from the code.
REFUSALS = ("backend", "layout", "num_tokens", "unknown_room", "expired", "failed", "transfer_failed")


class BadMessage(ValueError):
    """A frame that is not a valid message of this version. `reason` is what /metrics counts:
    malformed, oversized or version."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class NixlTarget:
    """Where a decode server's claim asks the prefill server to write: its NIXL agent (with the
    metadata to reach it), the base addresses of its K and V caches, and the pages reserved."""

    agent: str
    metadata: bytes
    k_address: int
    v_address: int
    num_slots: int
    pages: tuple[int, ...]


@dataclass(frozen=True)
class Claim:
    room: int
    num_tokens: int  # the prompt's: the decode server holds pages for them
    layout: KVLayout
    backend: str
    target: NixlTarget | None = None  # with nixl


@dataclass(frozen=True)
class Received:
    room: int
    ok: bool  # False: the decode server no longer waited for it


@dataclass(frozen=True)
class Cancel:
    room: int


@dataclass(frozen=True)
class Writing:
    room: int


@dataclass(frozen=True)
class KVReady:
    """The first token (and its logprobs, if the request asked); with tcp the K and V frames
    ([layers, num_tokens, heads, dim] each) follow, with nixl the write has completed."""

    room: int
    first_token: int
    num_tokens: int
    num_bytes: int = 0
    seconds: float = 0.0
    first_logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Refused:
    room: int
    code: str  # one of REFUSALS
    layout: KVLayout | None = None  # code "layout": the prefill server's
    backend: str | None = None  # code "backend": the prefill server's
    num_tokens: int | None = None  # code "num_tokens": the prompt's on the prefill server


@dataclass(frozen=True)
class Ping:
    pass


Message = Claim | Received | Cancel | Writing | KVReady | Refused | Ping
KINDS = {Claim: "claim", Received: "received", Cancel: "cancel", Writing: "writing", KVReady: "kv", Refused: "refused",
         Ping: "ping"}


# ---- encoding ------------------------------------------------------------------------------------


def encode(message: Message, *raw: bytes | memoryview) -> list:
    """The frames of `message`; `raw` are the K and V frames of a tcp KVReady."""
    fields = {"v": VERSION, "kind": KINDS[type(message)]}
    frames = []
    for name, value in vars(message).items():
        if isinstance(value, KVLayout):
            value = vars(value)
        elif isinstance(value, TokenLogprob):
            value = {"token_id": value.token_id, "logprob": value.logprob, "top": [list(t) for t in value.top]}
        elif isinstance(value, NixlTarget):
            frames.append(value.metadata)
            value = {k: list(v) if k == "pages" else v for k, v in vars(value).items() if k != "metadata"}
        fields[name] = value
    return [json.dumps(fields, separators=(",", ":")).encode(), *frames, *raw]


# ---- decoding: every field checked -----------------------------------------------------------------


def decode(frames: list) -> tuple[Message, list]:
    """(the message, its raw frames after the header) of a received multipart message."""
    if not frames:
        raise BadMessage("an empty message")
    head = bytes(frames[0])
    if len(head) > MAX_HEADER:
        raise BadMessage(f"a header of {len(head)} bytes (at most {MAX_HEADER})", "oversized")
    try:
        fields = json.loads(head)
    except (UnicodeDecodeError, ValueError):
        raise BadMessage("a header that is not JSON") from None
    if not isinstance(fields, dict):
        raise BadMessage("a header that is not a JSON object")
    if fields.get("v") != VERSION:
        raise BadMessage(f"protocol version {str(fields.get('v'))[:20]!r} (this server speaks {VERSION})", "version")
    kind = fields.get("kind")
    decoder = DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise BadMessage(f"an unknown message kind {str(kind)[:40]!r}", "version")
    message, num_raw = decoder(Fields(fields), frames[1:])
    if len(frames) - 1 != num_raw:
        raise BadMessage(f"{len(frames) - 1} frames after a {kind!r} header (expected {num_raw})")
    return message, frames[1:]


class Fields:
    """A received header's fields, each taken with a check of its type and range."""

    def __init__(self, fields: dict):
        self.fields = fields

    def int(self, name: str, low: int = 0, high: int = MAX_INT, optional: bool = False):
        value = self.fields.get(name)
        if value is None and optional:
            return None
        if type(value) is not int or not low <= value < high:
            raise BadMessage(f"{name} must be an integer in [{low}, {high}), got {str(value)[:40]}")
        return value

    def float(self, name: str) -> float:
        value = self.fields.get(name)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise BadMessage(f"{name} must be a finite number")
        return float(value)

    def str(self, name: str, choices: tuple[str, ...] | None = None, max_len: int = 256, optional: bool = False):
        value = self.fields.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > max_len or (choices is not None and value not in choices):
            raise BadMessage(f"{name} must be " + (f"one of {', '.join(choices)}" if choices else
                                                  f"a string of at most {max_len} characters"))
        return value

    def bool(self, name: str) -> bool:
        value = self.fields.get(name)
        if not isinstance(value, bool):
            raise BadMessage(f"{name} must be true or false")
        return value

    def nested(self, name: str, optional: bool = False) -> Fields | None:
        value = self.fields.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise BadMessage(f"{name} must be an object")
        return Fields(value)

    def list(self, name: str, max_len: int) -> list:
        value = self.fields.get(name)
        if not isinstance(value, list) or len(value) > max_len:
            raise BadMessage(f"{name} must be a list of at most {max_len} items")
        return value

    def room(self) -> int:
        return self.int("room", 0, MAX_ROOM)

    def layout(self, optional: bool = False) -> KVLayout | None:
        f = self.nested("layout", optional)
        if f is None:
            return None
        return KVLayout(f.int("num_layers", 1, 1 << 16), f.int("num_kv_heads", 1, 1 << 16), f.int("head_dim", 1, 1 << 16),
                        f.str("dtype", DTYPES), f.int("page_size", 1, 1 << 16))

    def logprob(self) -> TokenLogprob | None:
        f = self.nested("first_logprob", optional=True)
        if f is None:
            return None
        top = []
        for pair in f.list("top", MAX_TOP_LOGPROBS):
            if not isinstance(pair, list) or len(pair) != 2:
                raise BadMessage("first_logprob.top must hold [token id, logprob] pairs")
            pair = Fields({"token_id": pair[0], "logprob": pair[1]})
            top.append((pair.int("token_id"), pair.float("logprob")))
        return TokenLogprob(f.int("token_id"), f.float("logprob"), top)


def _claim(f: Fields, raw: list) -> tuple[Claim, int]:
    num_tokens = f.int("num_tokens", 1, 1 << 31)
    backend = f.str("backend", BACKENDS)
    t = f.nested("target", optional=True)
    target = None
    if t is not None:
        if not raw or len(raw[0]) > MAX_METADATA:
            raise BadMessage(f"a claim's NIXL metadata must be one frame of at most {MAX_METADATA} bytes", "oversized")
        pages = t.list("pages", num_tokens + 1)
        num_slots = t.int("num_slots", 1, 1 << 40)
        for page in pages:
            if type(page) is not int or not 0 <= page < num_slots:
                raise BadMessage("target.pages must be page indices within the target's cache")
        target = NixlTarget(t.str("agent", max_len=128), bytes(raw[0]), t.int("k_address", 1, 1 << 64),
                            t.int("v_address", 1, 1 << 64), num_slots, tuple(pages))
    return Claim(f.room(), num_tokens, f.layout(), backend, target), int(target is not None)


def _kv_ready(f: Fields, raw: list) -> tuple[KVReady, int]:
    ready = KVReady(f.room(), f.int("first_token", 0, 1 << 31), f.int("num_tokens", 1, 1 << 31),
                    f.int("num_bytes"), f.float("seconds"), f.logprob())
    return ready, len(raw) if len(raw) in (0, 2) else 2  # tcp: K and V follow


def _refused(f: Fields, raw: list) -> tuple[Refused, int]:
    return Refused(f.room(), f.str("code", REFUSALS), f.layout(optional=True), f.str("backend", BACKENDS, optional=True),
                   f.int("num_tokens", 0, 1 << 31, optional=True)), 0


DECODERS = {
    "claim": _claim,
    "received": lambda f, raw: (Received(f.room(), f.bool("ok")), 0),
    "cancel": lambda f, raw: (Cancel(f.room()), 0),
    "writing": lambda f, raw: (Writing(f.room()), 0),
    "kv": _kv_ready,
    "refused": _refused,
    "ping": lambda f, raw: (Ping(), 0),
}
