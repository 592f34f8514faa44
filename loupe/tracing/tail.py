"""Tail keeping, in the span exporter: spans of undecided traces wait for their verdict.

A request that head sampling did not pick, on a server with a keep rule
(`--trace-keep-errors`, `--trace-keep-slower-than-ms`), is recorded in every process as if
sampled, its context saying UNDECIDED. Those spans reach the exporter in batches that name
their trace ids as undecided, and wait here. When the request's root span ends, the main
process sends the verdict (kept, and why, or discarded): the trace's spans go to the export
queue or away, and spans of it that arrive later (other processes flush up to 250 ms
after) follow the remembered verdict.

Held spans count against the exporter's queue bound, and may fill at most half of it, so
that sampled spans always find room. A trace whose spans no longer fit is given up whole
(its spans counted as dropped, the trace as discarded for "no_room") rather than kept in
part. A trace whose root never ends within `HOLD_LIMIT_S` is discarded as "expired", so a
lost verdict cannot hold room for ever.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict

HOLD_LIMIT_S = 3600.0
VERDICTS_REMEMBERED = 65536
KEPT, DISCARDED, GIVEN_UP = "kept", "discarded", "given up"


def trace_of(entry: tuple) -> int:
    """The trace id of a queued span: `(record, offset)` or `(fanout, offset, parent)`."""
    return entry[0].trace_id if len(entry) == 2 else entry[2][0]


class TailKeeper:
    def __init__(self, max_held: int) -> None:
        self.max_held = max_held
        self.held: dict[int, list] = {}  # trace id -> its spans, as queued
        self.held_since: dict[int, float] = {}
        self.num_held = 0
        self.verdicts: OrderedDict[int, str] = OrderedDict()  # trace id -> KEPT, DISCARDED or GIVEN_UP
        self.kept: Counter = Counter()  # traces, by reason
        self.discarded: Counter = Counter()

    def sort(self, entries: list, undecided: set, room: int) -> tuple[list, int]:
        """Of a batch's spans, those to queue now (decided, or of a trace already kept); the
        spans of undecided traces are held while `room` (in the queue) and the hold's own
        bound allow. Returns the spans to queue and how many were dropped."""
        ready, dropped = [], 0
        for entry in entries:
            trace_id = trace_of(entry)
            if trace_id not in undecided:
                ready.append(entry)
                continue
            verdict = self.verdicts.get(trace_id)
            if verdict == KEPT:
                ready.append(entry)
            elif verdict == GIVEN_UP:
                dropped += 1
            elif verdict is None and room > 0 and self.num_held < self.max_held:
                self.held.setdefault(trace_id, []).append(entry)
                self.held_since.setdefault(trace_id, time.monotonic())
                self.num_held += 1
                room -= 1
            elif verdict is None:  # no room: give the whole trace up rather than keep a part of it
                dropped += 1 + len(self._release(trace_id))
                self._remember(trace_id, GIVEN_UP)
        return ready, dropped

    def settle(self, trace_id: int, reason: str | None) -> list:
        """The verdict on a trace (kept for `reason`, or discarded when None): returns its held
        spans when kept."""
        if self.verdicts.get(trace_id) == GIVEN_UP:
            self.discarded["no_room"] += 1
            return []
        spans = self._release(trace_id)
        self._remember(trace_id, DISCARDED if reason is None else KEPT)
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
            self._remember(trace_id, DISCARDED)
            self.discarded["expired"] += 1

    def _remember(self, trace_id: int, verdict: str) -> None:
        self.verdicts[trace_id] = verdict
        if len(self.verdicts) > VERDICTS_REMEMBERED:
            self.verdicts.popitem(last=False)

    def _release(self, trace_id: int) -> list:
        self.held_since.pop(trace_id, None)
        spans = self.held.pop(trace_id, [])
        self.num_held -= len(spans)
        return spans
