"""The plain types every layer shares: a request, its sampling parameters and limits, how it
ends, and its trace context. Builtin types only, so they pickle between processes; this
module imports nothing of loupe and sits at the bottom of every import chain."""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from dataclasses import dataclass, field, fields

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class InvalidRequest(ValueError):
    """A request that cannot run; `param` names the field at fault. An error made by `about`
    starts its text with the field's name, so an API that spells the field its own way
    (OpenAI's max_tokens for max_new_tokens) can name it so (`named`)."""

    def __init__(self, message: str, param: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.param, self.detail = param, detail

    @classmethod
    def about(cls, param: str, detail: str) -> InvalidRequest:
        """"<param><detail>", e.g. about("top_p", " must be a number in (0, 1], got 2")."""
        return cls(param + detail, param, detail)

    def named(self, names: dict[str, str]) -> tuple[str, str | None]:
        """The text and the field's name, the field spelled as `names` maps it."""
        param = names.get(self.param, self.param)
        return (param + self.detail if self.detail is not None else str(self)), param


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # report each output token's logprob (runner/sampler.py token_logprobs)
    top_logprobs: int = 0  # and this many most likely tokens at each position

    @classmethod
    def from_dict(cls, params: dict | None) -> SamplingParams:
        """Build and validate; a bad value raises InvalidRequest naming the parameter."""
        params = dict(params or {})
        unknown = sorted(set(params) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter {unknown[0]!r}", unknown[0])
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        params = {k: v for k, v in params.items() if v is not None}
        sp = cls(**params)
        sp.validate()
        return sp

    def validate(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise InvalidRequest.about(name, f" must be {rule}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")
        check(is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k", "-1 or an integer >= 1")
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed", "an integer in [0, 2**63)")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
              "stop", "a non-empty string or a list of them")
        check(isinstance(self.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "a list of token ids")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean")
        check(isinstance(self.logprobs, bool), "logprobs", "a boolean")
        check(is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
              f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        check(self.logprobs or self.top_logprobs == 0, "top_logprobs", "0 unless logprobs is true")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenLogprob:
    """One output token's log-probability under the model's own distribution (the log-softmax
    of the raw logits, before temperature and the top-k/top-p/min-p filters), and the most
    likely tokens at its position, best first (as many as the request's `top_logprobs`)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob)


@dataclass(frozen=True)
class RequestLimits:
    """What a request must fit in: the served model's, known wherever requests are checked."""

    vocab_size: int
    context_length: int
    max_total_tokens: int

    def check(self, input_ids: list[int], sampling: SamplingParams) -> None:
        """Raise InvalidRequest (naming what is wrong) if the request cannot run."""
        if not input_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in input_ids):
            raise InvalidRequest.about("input_ids", f" must be token ids in [0, {vocab})")
        n = len(input_ids)
        if n >= self.context_length:
            raise InvalidRequest(f"the prompt has {n} tokens; the context length is {self.context_length}", "prompt")
        if n + sampling.max_new_tokens > self.context_length:
            raise InvalidRequest.about("max_new_tokens", f"={sampling.max_new_tokens} plus the prompt's {n} "
                                       f"tokens exceeds the context length {self.context_length}")
        if n + sampling.max_new_tokens > self.max_total_tokens:
            raise InvalidRequest.about("max_new_tokens", f"={sampling.max_new_tokens} plus the prompt's {n} "
                                       f"tokens do not fit in the KV cache ({self.max_total_tokens} tokens)")


@dataclass(frozen=True)
class ModelInfo:
    """What a scheduler reports of the model it serves once it is loaded."""

    model_path: str
    device: str
    dtype: str
    quantization: str  # "none" or "int4"
    load_seconds: float
    limits: RequestLimits

    def as_dict(self) -> dict:
        return {"model_path": self.model_path, "device": self.device, "dtype": self.dtype,
                "quantization": self.quantization,
                "load_seconds": self.load_seconds, "max_total_tokens": self.limits.max_total_tokens,
                "context_length": self.limits.context_length}


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Outcome(enum.StrEnum):
    """How a request ended, as its root span's `loupe.request.outcome` and /metrics say."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"  # the client went away, or it was aborted: not an error
    REJECTED = "rejected"  # refused (4xx) before it ran
    OVERLOADED = "overloaded"  # refused for want of room (503, 429): the server's to fix, an error
    FAILED = "failed"  # it broke: a peer's KV never came, a process died, a bug

    @classmethod
    def of_result(cls, finish_reason: str, error: str | None) -> Outcome:
        """A request that reached the scheduler."""
        return cls.FAILED if error else cls.CANCELLED if finish_reason == FinishReason.ABORT else cls.COMPLETED

    @classmethod
    def of_refusal(cls, http_status: int) -> Outcome:
        """A request answered with an HTTP error before it ran."""
        if http_status in (429, 503):
            return cls.OVERLOADED
        return cls.REJECTED if http_status < 500 else cls.FAILED

    @property
    def is_error(self) -> bool:
        """Whether its span's status is ERROR (a client's 4xx, like a cancellation, is not the server's)."""
        return self in (Outcome.OVERLOADED, Outcome.FAILED)


class TraceDecision(enum.IntEnum):
    """Whether a request's spans are recorded and exported. Made when the request arrives;
    an undecided request's fate is settled when it ends (tail keeping: tracing/tail.py)."""

    OFF = 0  # nothing is recorded, in any process
    UNDECIDED = 1  # recorded; exported or discarded once the root span has ended
    SAMPLED = 2  # recorded and exported


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


@dataclass(frozen=True)
class TraceContext:
    """What every process needs to attach its spans to a request's trace. Plain ints and
    strings, so it pickles into request messages without the OpenTelemetry SDK."""

    trace_id: int
    root_span_id: int
    level: int  # 1-3 (SPEC §5.4), fixed when the request enters
    decision: TraceDecision = TraceDecision.SAMPLED
    remote_parent_id: int | None = None  # the caller's span, from an inbound traceparent
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        return format_traceparent(self.trace_id, self.root_span_id, self.decision == TraceDecision.SAMPLED)


WILDCARD_HOSTS = ("", "*", "0.0.0.0", "::", "[::]")
HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def is_host(host: str) -> bool:
    """Whether `host` is an IP address (IPv6 with or without brackets) or a host name (RFC 1123)."""
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
        return True
    except ValueError:
        return HOST_NAME.fullmatch(host) is not None


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface (no name is looked up)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Bootstrap:
    """Where a disaggregated request's KV comes from: the prefill server's bootstrap address,
    and the room (a random 63-bit id) the router gave both servers for this request."""

    host: str
    port: int
    room: int

    def check(self, allowed: list[str] | None = None, secret: bool = False, connects: bool = True) -> None:
        """Raise InvalidRequest naming the field if a decode server (`connects`) must not connect
        here: a malformed or wildcard host, a port or room out of range, a host off the
        allow-list (`host` or `host:port` entries), or beyond loopback without a shared secret.
        For a prefill server only the room is checked."""
        if not 0 <= self.room < 1 << 64:
            raise InvalidRequest(f"bootstrap_room must be in 0..2**64-1, got {self.room}", "bootstrap_room")
        if not connects:
            return
        host = self.host
        if host in WILDCARD_HOSTS or not is_host(host):
            raise InvalidRequest(f"bootstrap_host must be a host name or address, got {host[:64]!r}", "bootstrap_host")
        if not 0 < self.port < 65536:
            raise InvalidRequest(f"bootstrap_port must be in 1..65535, got {self.port}", "bootstrap_port")
        if allowed and host.lower() not in allowed and f"{host.lower()}:{self.port}" not in allowed:
            raise InvalidRequest(f"bootstrap_host {host}:{self.port} is not among this server's "
                                 "--disaggregation-prefill-hosts", "bootstrap_host")
        if not secret and not is_loopback(host):
            raise InvalidRequest(f"bootstrap_host {host} is not on loopback, and this decode server has no "
                                 "--disaggregation-secret to authenticate it with", "bootstrap_host")


@dataclass(frozen=True)
class KVLayout:
    """What must agree for one server's KV to fit the other's cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int


@dataclass
class TokenizedRequest:
    """A request checked once, where it enters, and sent to the scheduler as it is."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    trace: TraceContext | None = None  # None when nothing of the request is recorded
    bootstrap: Bootstrap | None = None  # on both servers of a prefill/decode pair

    @classmethod
    def validated(cls, rid: str, input_ids: list[int], params: dict | None, limits: RequestLimits,
                  trace: TraceContext | None = None, bootstrap: Bootstrap | None = None) -> TokenizedRequest:
        """Raise InvalidRequest naming the first bad parameter, or what does not fit `limits`."""
        sampling = SamplingParams.from_dict(params)
        limits.check(input_ids, sampling)
        return cls(rid, list(input_ids), sampling, trace, bootstrap)
