"""Which requests are traced: the level, head sampling and per-request choice (SPEC §5.7).

The decision is made once, in the main process, when a request arrives, and travels in its
trace context to every process:

    level 0 (off)                    nothing is traced
    metadata {"trace": "true"|...}   the request's own choice, at any ratio
    a caller's traceparent           its sampled flag decides, under a parent-based sampler
    otherwise                        the ratio, a pure function of the trace id: every loupe
                                     server decides the same trace alike (a PD pair, a
                                     router's workers)
    not picked, with a keep rule     UNDECIDED: recorded, and exported only if the request
                                     fails, is cancelled (when asked) or runs slow (`verdict`, when its root span ends;
                                     the exporter holds its spans until then: tracing/tail.py)

The settings can change while serving (`POST /tracing`, `/set_trace_level`); requests that
arrive afterwards follow them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from loupe.core import Outcome, TraceDecision
from loupe.tracing.settings import parsed

SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
ID_SPACE = 1 << 64
# What each setting changed while serving must be: (said in the refusal, the check).
RULES = {
    "level": ("an integer in 0..3", lambda v: type(v) is int and 0 <= v <= 3),
    "sampling_ratio": ("a number in [0, 1]", lambda v: type(v) in (int, float) and 0 <= v <= 1),
    "parent_based": ("true or false", lambda v: type(v) is bool),
    "keep_errors": ("true or false", lambda v: type(v) is bool),
    "keep_cancelled": ("true or false", lambda v: type(v) is bool),
    "keep_slower_than_ms": ("a number of milliseconds >= 0, or null",
                            lambda v: v is None or (type(v) in (int, float) and v >= 0)),
}


def ratio_keeps(trace_id: int, ratio: float) -> bool:
    """The trace-id ratio decision, as OpenTelemetry's TraceIdRatioBased makes it: on the low
    64 bits of the id, so that it is the same wherever the id goes."""
    return (trace_id & (ID_SPACE - 1)) < round(ratio * ID_SPACE)


@dataclass
class TraceControl:
    level: int  # 0: off, 1-3: SPEC §5.4
    sampling_ratio: float = 1.0
    parent_based: bool = True
    keep_errors: bool = False
    keep_slower_than_ms: float | None = None
    keep_cancelled: bool = False

    @classmethod
    def from_env(cls, level: int, ratio_flag: float | None, keep_errors: bool = False,
                 keep_slower_than_ms: float | None = None, keep_cancelled: bool = False) -> TraceControl:
        """OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, the --trace-sampling-ratio flag
        winning over the ratio they give; ValueError names a bad variable."""
        sampler = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        if sampler not in SAMPLERS:
            raise ValueError(f"OTEL_TRACES_SAMPLER must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        ratio = 0.0 if sampler.endswith("always_off") else 1.0
        if sampler.endswith("traceidratio"):
            ratio = parsed(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"), float, lambda v: 0 <= v <= 1,
                           "OTEL_TRACES_SAMPLER_ARG", "a ratio in [0, 1]")
        return cls(level, ratio if ratio_flag is None else ratio_flag, sampler.startswith("parentbased"),
                   keep_errors, keep_slower_than_ms, keep_cancelled)

    def decide(self, trace_id: int, parent_flags: int | None, wanted: bool | None = None) -> TraceDecision:
        """The decision for a new request: `parent_flags` from its caller's traceparent (None
        without one), `wanted` from its own metadata (None: no choice made)."""
        if self.level == 0 or wanted is False:
            return TraceDecision.OFF
        if wanted:
            keep = True
        elif self.parent_based and parent_flags is not None:
            keep = bool(parent_flags & 1)
        else:
            keep = ratio_keeps(trace_id, self.sampling_ratio)
        if keep:
            return TraceDecision.SAMPLED
        tail_rules = self.keep_errors or self.keep_cancelled or self.keep_slower_than_ms is not None
        return TraceDecision.UNDECIDED if tail_rules else TraceDecision.OFF

    def verdict(self, outcome: Outcome, seconds: float) -> str | None:
        """Why an UNDECIDED request that ended so after `seconds` end to end is kept ("error":
        failed or overloaded; "cancelled"; "slow"), or None: it is discarded."""
        if outcome.is_error and self.keep_errors:
            return "error"
        if outcome == Outcome.CANCELLED and self.keep_cancelled:
            return "cancelled"
        if self.keep_slower_than_ms is not None and seconds * 1000 > self.keep_slower_than_ms:
            return "slow"
        return None

    def update(self, changes: dict) -> None:
        """Apply `{name: value}` from an API call; ValueError naming the first bad one (and
        nothing is changed then)."""
        unknown = sorted(set(changes) - set(RULES))
        if unknown:
            raise ValueError(unknown[0], f"unknown tracing setting {unknown[0]!r}")
        for name, value in changes.items():
            said, holds = RULES[name]
            if not holds(value):
                raise ValueError(name, f"{name} must be {said}, got {value!r}")
        for name, value in changes.items():
            setattr(self, name, float(value) if type(value) is int and name != "level" else value)

    def settings(self) -> dict:
        return asdict(self)
