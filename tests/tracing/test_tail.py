"""Tail keeping: the decision, the verdict, and the exporter holding undecided traces."""

import pytest

from loupe import ipc
from loupe.core import Outcome, TraceDecision
from loupe.tracing import tail
from loupe.tracing.exporter import ExporterProcess
from loupe.tracing.recorder import Fanout, SpanRecord
from loupe.tracing.sampling import TraceControl
from loupe.tracing.settings import ExportSettings

UNDECIDED, KEPT, DISCARDED, SAMPLED = 0xA, 0xB, 0xC, 0xD


def control(**rules) -> TraceControl:
    return TraceControl(3, sampling_ratio=0.0, **rules)


def test_requests_head_sampling_skips_are_undecided_only_under_a_keep_rule():
    assert control().decide(1, None) == TraceDecision.OFF
    for rules in ({"keep_errors": True}, {"keep_slower_than_ms": 500.0}):
        assert control(**rules).decide(1, None) == TraceDecision.UNDECIDED
        assert control(**rules).decide(1, 0x00) == TraceDecision.UNDECIDED  # the caller's 00 included
        assert control(**rules).decide(1, 0x01) == TraceDecision.SAMPLED
        assert control(**rules).decide(1, None, wanted=False) == TraceDecision.OFF  # the request said no
    off = control(keep_errors=True)
    off.level = 0
    assert off.decide(1, None, wanted=True) == TraceDecision.OFF


def test_the_verdict_names_the_rule_that_kept_the_trace():
    both = control(keep_errors=True, keep_slower_than_ms=500.0)
    for outcome in (Outcome.FAILED, Outcome.OVERLOADED):
        assert both.verdict(outcome, seconds=0.1) == "error"
    assert both.verdict(Outcome.COMPLETED, seconds=0.6) == "slow"
    for outcome in (Outcome.COMPLETED, Outcome.REJECTED, Outcome.CANCELLED):  # not the server's errors
        assert both.verdict(outcome, seconds=0.4) is None
    assert control(keep_slower_than_ms=500.0).verdict(Outcome.FAILED, seconds=0.1) is None
    assert control(keep_errors=True).verdict(Outcome.COMPLETED, seconds=1e6) is None
    cancelled = control(keep_cancelled=True)
    assert cancelled.decide(1, None) == TraceDecision.UNDECIDED
    assert cancelled.verdict(Outcome.CANCELLED, seconds=0.1) == "cancelled"
    assert cancelled.verdict(Outcome.FAILED, seconds=0.1) is None  # only when asked: each rule its own


def test_keep_rules_change_while_serving_and_bad_ones_change_nothing():
    c = control()
    c.update({"keep_errors": True, "keep_slower_than_ms": 250})
    assert c.settings()["keep_slower_than_ms"] == 250.0 and c.keep_errors
    c.update({"keep_slower_than_ms": None})
    assert c.keep_slower_than_ms is None
    for bad in ({"keep_errors": "yes"}, {"keep_slower_than_ms": -1}, {"keep_slower_than_ms": "1"},
                {"keep_errors": False, "keep_slower_than_ms": True}):
        with pytest.raises(ValueError) as refused:
            c.update(bad)
        assert refused.value.args[0] in bad
    assert c.keep_errors and c.keep_slower_than_ms is None


@pytest.fixture
def exporter():
    """An exporter process's queueing, without its process or a backend (nothing is sent)."""
    return ExporterProcess(ExportSettings("http://127.0.0.1:9", "grpc", 50, 64, 12), ipc.Endpoints.create(dp_size=1))


def record(trace_id: int, span_id: int) -> SpanRecord:
    return SpanRecord(trace_id, span_id, None, "s", 100, 200)


def queued(proc: ExporterProcess) -> list[tuple[int, int]]:
    """(trace id, span id or parent id) of each queued span."""
    return [(e[0].trace_id, e[0].span_id) if len(e) == 2 else e[2][:2] for e in proc.queue]


def batch(spans: list, undecided: set, verdicts: list = (), fanout_parents: list = ()) -> ipc.SpanBatch:
    fanouts = [Fanout("decode_step", 1, 2, {}, list(fanout_parents))] if fanout_parents else []
    return ipc.SpanBatch(0, spans, fanouts, 0, set(undecided), list(verdicts))


def test_undecided_spans_wait_for_their_verdict_and_follow_it(exporter):
    exporter.add(batch([record(SAMPLED, 1), record(UNDECIDED, 2), record(KEPT, 3), record(DISCARDED, 4)],
                       {UNDECIDED, KEPT, DISCARDED}, fanout_parents=[(KEPT, 3, 1), (DISCARDED, 4, None)]))
    assert queued(exporter) == [(SAMPLED, 1)] and exporter.tail.num_held == 5
    exporter.add(batch([record(KEPT, 5)], {KEPT, DISCARDED}, [(KEPT, "slow"), (DISCARDED, None)]))
    assert queued(exporter) == [(SAMPLED, 1), (KEPT, 3), (KEPT, 3), (KEPT, 5)]
    exporter.add(batch([record(KEPT, 6), record(DISCARDED, 7)], {KEPT, DISCARDED}))  # late: the verdict stands
    assert queued(exporter)[-1] == (KEPT, 6) and len(exporter.queue) == 5
    assert exporter.tail.num_held == 1 and list(exporter.tail.held) == [UNDECIDED]
    stats = exporter.stats()
    assert (stats.kept, stats.discarded, stats.dropped) == ({"slow": 1}, {"ok": 1}, 0)


def test_held_spans_count_against_the_queue_bound_and_a_trace_that_does_not_fit_is_given_up(exporter):
    exporter.add(batch([record(SAMPLED, i) for i in range(8)], set()))  # room for 12 in all
    exporter.add(batch([record(UNDECIDED, i) for i in range(6)], {UNDECIDED}))
    assert exporter.tail.num_held == 0 and exporter.dropped == 6  # 4 fitted, then all 6 went
    exporter.add(batch([record(UNDECIDED, 7)], {UNDECIDED}, [(UNDECIDED, "error")]))
    assert exporter.dropped == 7 and len(exporter.queue) == 8  # nothing of it is kept in part
    assert exporter.stats().discarded == {"no_room": 1} and exporter.stats().kept == {}


def test_held_spans_fill_at_most_half_the_queue_so_sampled_ones_find_room(exporter):
    exporter.add(batch([record(UNDECIDED, i) for i in range(7)], {UNDECIDED}))
    assert exporter.tail.num_held == 0 and exporter.dropped == 7  # more than half of 12: given up
    exporter.add(batch([record(KEPT, i) for i in range(6)], {KEPT}))
    exporter.add(batch([record(SAMPLED, i) for i in range(7)], set()))
    assert exporter.tail.num_held == 6 and len(exporter.queue) == 6 and exporter.dropped == 8
    exporter.add(batch([], {KEPT}, [(KEPT, "slow")]))
    assert len(exporter.queue) == 12 and exporter.tail.num_held == 0


def test_a_trace_that_never_ends_is_discarded_as_expired(exporter, monkeypatch):
    exporter.add(batch([record(UNDECIDED, 1)], {UNDECIDED}))
    exporter.tail.expire(now=exporter.tail.held_since[UNDECIDED] + tail.HOLD_LIMIT_S / 2)
    assert exporter.tail.num_held == 1
    exporter.tail.expire(now=exporter.tail.held_since[UNDECIDED] + tail.HOLD_LIMIT_S + 1)
    assert exporter.tail.num_held == 0 and exporter.stats().discarded == {"expired": 1} and not exporter.queue
