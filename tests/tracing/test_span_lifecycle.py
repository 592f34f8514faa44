"""Every path closes a request's spans and leaves no tracing state behind (in-process)."""

import pytest

from loupe import Engine, ipc
from loupe.detokenizer import DetokenizerProcess
from loupe.scheduler.request import SamplingParams
from loupe.tracing.context import TraceContext
from loupe.tracing.spans import SchedulerTracer

PROMPTS = ["The capital of France is Paris. The capital of Italy is", "Hello, my name is loupe and I trace",
           "one two three four five six seven", "Where did the time of this request go? Into prefill,"]


class CapturingRecorder:
    """Stands in for the ZMQ recorder: keeps what would be sent."""

    thread_name, thread_attributes, offset_ns = "Scheduler [TP 0] (host:x | pid:1)", {"thread_label": "Scheduler"}, 0

    def __init__(self):
        self.spans, self.fanouts = [], []

    def span(self, trace_id, span_id, parent_id, name, start, end, attributes=None, events=None, error=None,
             kind=1, tracestate=None, remote_parent=False):
        assert start <= end, name
        self.spans.append({"trace": trace_id, "id": span_id, "parent": parent_id, "name": name,
                           "attributes": attributes or {}, "error": error})

    def fanout(self, name, start, end, attributes, parents):
        self.fanouts.append((name, parents))

    def maybe_flush(self):
        pass


def traced_scheduler(tiny_model_dir, **flags):
    engine = Engine(tiny_model_dir("llama"), dtype="float32", **flags)
    recorder = CapturingRecorder()
    engine.scheduler.tracer = SchedulerTracer(recorder)
    return engine.scheduler, engine.tokenizer, recorder


def add(scheduler, tokenizer, i, prompt, level=3, max_new_tokens=40):
    req = scheduler.make_request(f"r{i}", tokenizer.encode(prompt),
                                 SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True))
    req.trace = TraceContext(trace_id=i + 1, root_span_id=1000 + i, level=level)
    scheduler.tracer.on_arrival(req, req.trace)
    scheduler.add_request(req)
    return req


def check_closed(recorder, req, trace_id):
    mine = [s for s in recorder.spans if s["trace"] == trace_id]
    thread = [s for s in mine if s["name"].startswith("Scheduler")]
    assert len(thread) == 1 and thread[0]["parent"] == 1000 + trace_id - 1
    stages = [s for s in mine if s["name"] in ("queue", "prefill", "decode")]
    assert all(s["parent"] == thread[0]["id"] for s in stages)
    assert req.spans is None  # nothing of the request's tracing is left in the scheduler
    return mine


def test_finish_and_retraction_close_every_span(tiny_model_dir):
    scheduler, tokenizer, recorder = traced_scheduler(tiny_model_dir, page_size=4, max_total_tokens=80)
    reqs = [add(scheduler, tokenizer, i, p) for i, p in enumerate(PROMPTS)]
    while scheduler.has_work:
        scheduler.step()
    assert sum(r.num_retractions for r in reqs) > 0
    for i, req in enumerate(reqs):
        spans = check_closed(recorder, req, i + 1)
        names = [s["name"] for s in spans]
        assert names.count("queue") == names.count("prefill") == 1 + req.num_retractions
        assert names.count("decode") >= 1
        if req.num_retractions:
            assert any(s["name"] == "queue" and s["attributes"].get("retracted") for s in spans)
            assert "retracted" in {e[0] for e in req.events}
        steps = sum(1 for name, parents in recorder.fanouts for t, _ in parents if t == i + 1)
        # Every token but those sampled at the end of a prefill (one per admission) is a decode step.
        assert len(req.output_ids) - 1 - req.num_retractions <= steps <= len(req.output_ids) - 1


def test_abort_and_shutdown_close_every_span(tiny_model_dir):
    scheduler, tokenizer, recorder = traced_scheduler(tiny_model_dir, max_running_requests=2)
    reqs = [add(scheduler, tokenizer, i, p) for i, p in enumerate(PROMPTS)]
    for _ in range(3):
        scheduler.step()
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 2
    assert scheduler.abort("r0") is reqs[0]
    scheduler.abort_all()  # what the scheduler process does on SIGTERM
    assert not scheduler.has_work
    for i, req in enumerate(reqs):
        spans = check_closed(recorder, req, i + 1)
        thread = next(s for s in spans if s["name"].startswith("Scheduler"))
        assert thread["error"] and thread["attributes"]["finish_reason"] == "abort"
        assert "abort" in {e[0] for e in req.events}


@pytest.mark.parametrize("level,expected", [(1, 0), (2, 4)])
def test_lower_levels_record_less(tiny_model_dir, level, expected):
    scheduler, tokenizer, recorder = traced_scheduler(tiny_model_dir, chunked_prefill_size=4)
    req = add(scheduler, tokenizer, 0, PROMPTS[0], level=level, max_new_tokens=5)
    while scheduler.has_work:
        scheduler.step()
    assert len(recorder.spans) == expected  # level 2: thread, queue, prefill, decode
    assert recorder.fanouts == []
    assert req.spans is None


def test_detokenizer_keeps_no_state_after_finish_or_abort(tiny_model_dir):
    class Args:
        model_path, enable_tracing = tiny_model_dir("llama"), False

    detokenizer = DetokenizerProcess.__new__(DetokenizerProcess)
    from loupe.model.loader import load_tokenizer

    detokenizer.tokenizer, detokenizer.tracer, detokenizer.states = load_tokenizer(Args.model_path), None, {}
    for rid, ending in (("a", "length"), ("b", "abort")):
        detokenizer.convert(ipc.RequestOutput(rid, [5], stop=None))
        detokenizer.convert(ipc.RequestOutput(rid, [6]))
        assert rid in detokenizer.states
        detokenizer.convert(ipc.RequestOutput(rid, [] if ending == "abort" else [7], ending))
        assert rid not in detokenizer.states
