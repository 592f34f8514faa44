"""Tail keeping, in the span exporter: spans of undecided traces wait for their verdict.

A request that head sampling did not pick, on a server with a keep rule
(`--trace-keep-errors`, `--trace-keep-slower-than-ms`), is recorded in every process as if
sampled, its context saying UNDECIDED. Those spans reach the exporter in batches that name
their trace ids as undecided, and wait here. When the request's root span ends, the main
process sends the verdict (kept, and why, or discarded): the trace's spans go to the export
queue or away, and spans of it that arrive later (other processes flush up to 250 ms
after) follow the remembered verdict.

Held spans count against the exporter's queue bound; what does not fit is dropped and
counted as any dropped span is. A trace whose root never ends within `HOLD_LIMIT_S` is
discarded as "expired", so a lost verdict cannot hold room for ever.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict

HOLD_LIMIT_S = 3600.0
VERDICTS_REMEMBERED = 65536


def trace_of(entry: tuple) -> int:
    """The trace id of a queued span: `(record, offset)` or `(fanout, offset, parent)`."""
    return entry[0].trace_id if len(entry) == 2 else entry[2][0]


class TailKeeper:
    def __init__(self) -> None:
        self.held: dict[int, list] = {}  # trace id -> its spans, as queued
        self.held_since: dict[int, float] = {}
        self.num_held = 0
        self.verdicts: OrderedDict[int, bool] = OrderedDict()  # trace id -> kept
        self.kept: Counter = Counter()  # traces, by reason
        self.discarded: Counter = Counter()

    def sort(self, entries: list, undecided: set, room: int) -> tuple[list, int]:
        """Of a batch's spans, those to queue now (decided, or of a trace already kept); the
        spans of undecided traces are held, as many as `room` allows. Returns the spans to
        queue and how many were dropped for want of room."""
        ready, dropped = [], 0
        for entry in entries:
            trace_id = trace_of(entry)
            if trace_id not in undecided:
                ready.append(entry)
                continue
            verdict = self.verdicts.get(trace_id)
            if verdict is not None:
                if verdict:
                    ready.append(entry)
            elif room > 0:
                self.held.setdefault(trace_id, []).append(entry)
                self.held_since.setdefault(trace_id, time.monotonic())
                self.num_held += 1
                room -= 1
            else:
                dropped += 1
        return ready, dropped

    def settle(self, trace_id: int, reason: str | None) -> list:
        """The verdict on a trace (kept for `reason`, or discarded when None): returns its held
        spans when kept."""
        self.verdicts[trace_id] = reason is not None
        if len(self.verdicts) > VERDICTS_REMEMBERED:
            self.verdicts.popitem(last=False)
        spans = self._release(trace_id)
        if reason is None:
            self.discarded["ok"] += 1
            return []
        self.kept[reason] += 1
        return spans

    def expire(self, now: float) -> None:
        """Discard traces held longer than HOLD_LIMIT_S without a verdict."""
        expired = []
        for trace_id, since in self.held_since.items():  # oldest first
            if now - since <= HOLD_LIMIT_S:
                break
            expired.append(trace_id)
        for trace_id in expired:
            self._release(trace_id)
            self.discarded["expired"] += 1

    def _release(self, trace_id: int) -> list:
        self.held_since.pop(trace_id, None)
        spans = self.held.pop(trace_id, [])
        self.num_held -= len(spans)
        return spans
