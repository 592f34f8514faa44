"""The serving processes' span recorder: when it sends, and what a batch holds."""

import pytest
import zmq

from loupe import ipc
from loupe.core import TraceContext, TraceDecision
from loupe.tracing import recorder as recorder_module
from loupe.tracing.recorder import FLUSH_AT_SPANS, Recorder, SpanRecord


@pytest.fixture
def recorder_and_inbox(monkeypatch, tmp_path):
    """A recorder whose flush interval never runs out by itself, and the socket it sends to."""
    monkeypatch.setattr(recorder_module, "FLUSH_EVERY_NS", 10**12)
    endpoint = ipc.Endpoints(str(tmp_path)).tracing
    inbox = ipc.bind(zmq.Context.instance(), zmq.PULL, endpoint)
    recorder = Recorder(endpoint, "Test")
    yield recorder, inbox
    recorder.sock.close(0)
    inbox.close(0)


def test_fanouts_count_one_span_per_request_towards_a_send(recorder_and_inbox):
    recorder, inbox = recorder_and_inbox
    parents = [(1, p, None) for p in range(64)]
    steps = FLUSH_AT_SPANS // len(parents)
    for step in range(steps - 1):
        recorder.fanout("decode_step", step, step + 1, {"batch_size": 64}, parents)
        recorder.maybe_flush()
    assert not inbox.poll(200)  # fewer spans than a send's worth
    recorder.fanout("decode_step", steps, steps + 1, {"batch_size": 64}, parents)
    recorder.maybe_flush()
    assert inbox.poll(2000)
    batch = ipc.recv(inbox)
    assert len(batch.fanouts) == steps and batch.spans == [] and batch.dropped == 0
    assert recorder.fanouts == [] and recorder.fanout_spans == 0


def test_spans_wait_for_the_flush_interval_then_go_together(recorder_and_inbox):
    recorder, inbox = recorder_and_inbox
    recorder.span(SpanRecord(1, 2, None, "a", 0, 1))
    recorder.maybe_flush()
    recorder.span(SpanRecord(1, 3, 2, "b", 0, 1))
    recorder.maybe_flush()
    assert not inbox.poll(100)
    recorder.last_flush -= 10**12  # as if the interval had passed
    recorder.maybe_flush()
    assert inbox.poll(2000)
    assert [s.name for s in ipc.recv(inbox).spans] == ["a", "b"]


def test_a_batch_names_its_undecided_traces_and_a_verdict_survives_a_full_socket(recorder_and_inbox, monkeypatch):
    recorder, inbox = recorder_and_inbox
    held, sampled = TraceContext(7, 70, 3, TraceDecision.UNDECIDED), TraceContext(8, 80, 3)
    recorder.slice(held, 70, "queue", 0, 1)
    recorder.slice(sampled, 80, "queue", 0, 1)
    recorder.settle(7, "slow")

    def full(*_):
        raise zmq.Again()

    monkeypatch.setattr(recorder.sock, "send", full)
    recorder.flush()  # the exporter is behind: the spans are dropped and counted, the verdict waits
    assert recorder.dropped == 2 and recorder.verdicts == [(7, "slow")]
    monkeypatch.undo()
    recorder.flush()
    assert inbox.poll(2000)
    batch = ipc.recv(inbox)
    assert (batch.spans, batch.dropped, batch.undecided, batch.verdicts) == ([], 2, {7}, [(7, "slow")])
    assert recorder.undecided == set() and recorder.verdicts == []


def test_the_epoch_offset_comes_from_the_tightest_reading_not_one_a_pause_split(monkeypatch):
    """A process paused between its two clocks' reads (35 ms, as a loaded machine starting a
    server did) would shift every span it records by that much against its peers'."""
    wall = iter([1_000_000_000 + 35_000_000, *(1_000_000_000 + 100 * i for i in range(1, 20))])
    perf = iter([0, 35_000_000, *(t for i in range(1, 20) for t in (100 * i - 50, 100 * i + 50))])
    monkeypatch.setattr(recorder_module.time, "time_ns", lambda: next(wall))
    monkeypatch.setattr(recorder_module.time, "perf_counter_ns", lambda: next(perf))
    assert recorder_module.epoch_offset_ns() == 1_000_000_000
