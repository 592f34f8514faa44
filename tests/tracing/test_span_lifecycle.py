"""Every path closes a request's spans and leaves no tracing state behind (in-process)."""

import pytest

from harness import free_port
from loupe import Engine, ipc
from loupe.core import Bootstrap, FinishReason, Outcome, SamplingParams, TokenizedRequest, TraceContext, TraceDecision
from loupe.detokenizer import DetokenizerProcess
from loupe.tracing.recorder import Recorder
from loupe.tracing.sampling import TraceControl
from loupe.tracing.spans import RequestTracer, SchedulerTracer

PROMPTS = ["The capital of France is Paris. The capital of Italy is", "Hello, my name is loupe and I trace",
           "one two three four five six seven", "Where did the time of this request go? Into prefill,"]


class CapturingRecorder(Recorder):
    """The span recorder, keeping what it would send."""

    def __init__(self, tmp_path):
        super().__init__(ipc.Endpoints(str(tmp_path)).tracing, "Scheduler", {"TP": 0})
        self.sock.close(0)

    def maybe_flush(self):
        pass

    def named(self) -> list[dict]:
        for record in self.spans:
            assert record.start <= record.end, record.name
        return [{"trace": r.trace_id, "id": r.span_id, "parent": r.parent_id, "name": r.name,
                 "attributes": r.attributes or {}, "error": r.error, "events": r.events or []} for r in self.spans]


def traced_scheduler(tiny_model_dir, tmp_path, **flags):
    recorder = CapturingRecorder(tmp_path)
    engine = Engine(tiny_model_dir("llama"), dtype="float32", tracer=SchedulerTracer(recorder), **flags)
    return engine.scheduler, engine.tokenizer, recorder


def add(scheduler, tokenizer, i, prompt, level=3, max_new_tokens=40):
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    trace = TraceContext(trace_id=i + 1, root_span_id=1000 + i, level=level)
    return scheduler.add_request(TokenizedRequest(f"r{i}", tokenizer.encode(prompt), sampling, trace))


def check_closed(recorder, req, trace_id):
    mine = [s for s in recorder.named() if s["trace"] == trace_id]
    thread = [s for s in mine if s["name"].startswith("Scheduler")]
    assert len(thread) == 1 and thread[0]["parent"] == 1000 + trace_id - 1
    stages = [s for s in mine if s["name"] in ("queue", "prefill", "decode")]
    assert all(s["parent"] == thread[0]["id"] for s in stages)
    assert req.spans is None  # no span of the request is left open
    return mine


def test_finish_and_retraction_close_every_span(tiny_model_dir, tmp_path):
    scheduler, tokenizer, recorder = traced_scheduler(tiny_model_dir, tmp_path, page_size=4, max_total_tokens=80)
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
        steps = [(fanout.attributes["batch_id"], step)
                 for fanout in recorder.fanouts for t, _, step in fanout.parents if t == i + 1]
        # Every token but those sampled at the end of a prefill (one per admission) is a decode step.
        assert len(req.output_ids) - 1 - req.num_retractions <= len(steps) <= len(req.output_ids) - 1
        assert steps == sorted(steps) and len({b for b, _ in steps}) == len(steps)
        assert steps[-1][1] == len(req.output_ids) - 1  # the request's n-th decode made its (n+1)-th token
        # What ran with each step: a `schedule` event per batch the request was in, on its thread span.
        (thread,) = [s for s in spans if s["name"].startswith("Scheduler")]
        scheduled = {e[2]["batch_id"]: e[2] for e in thread["events"] if e[0] == "schedule"}
        for batch_id, _ in steps:
            assert scheduled[batch_id]["mode"] in ("decode", "mixed") and scheduled[batch_id]["batch_size"] >= 1
        prefills = [s for s in spans if s["name"] == "prefill_chunk"]
        assert all(scheduled[s["attributes"]["batch_id"]]["mode"] in ("prefill", "mixed") for s in prefills)


def test_abort_and_shutdown_close_every_span(tiny_model_dir, tmp_path):
    scheduler, tokenizer, recorder = traced_scheduler(tiny_model_dir, tmp_path, max_running_requests=2)
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
        assert thread["attributes"]["finish_reason"] == "abort"
        assert thread["error"] is None  # cancelled, not failed: the span's status is not ERROR
        assert "abort" in {e[0] for e in req.events}


def pd_engine(folder: str, recorder, mode: str, port: int) -> Engine:
    """An engine as a prefill or decode server's scheduler runs it, traced into `recorder`."""
    flags = {"disaggregation_bootstrap_port": port} if mode == "prefill" else {}
    return Engine(folder, dtype="float32", page_size=4, chunked_prefill_size=8, disaggregation_mode=mode,
                  disaggregation_timeout=30, disaggregation_transfer_backend="tcp",
                  tracer=SchedulerTracer(recorder, prefill_server=mode == "prefill"), **flags)


STAGES = {  # where the request is when it is aborted: the engine's mode, and its stages' spans by then
    "queued": ("null", ["queue"]), "prefilling": ("null", ["queue", "prefill"]),
    "decoding": ("null", ["queue", "prefill", "decode"]), "handed off": ("prefill", ["queue", "prefill"]),
    "receiving KV": ("decode", ["queue", "bootstrap"])}


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_abort_at_every_stage_ends_every_span_of_the_request(tiny_model_dir, tmp_path, stage):
    """Cancelled wherever it is (the client went away): its open stage and thread span end
    there, and no span of it is left open or marked an error."""
    mode, stages = STAGES[stage]
    recorder, folder, port = CapturingRecorder(tmp_path), tiny_model_dir("llama"), free_port()
    if mode == "null":
        eng = Engine(folder, dtype="float32", chunked_prefill_size=4, max_running_requests=1,
                     tracer=SchedulerTracer(recorder))
        others = []
    else:  # a decode engine whose prefill server (alive, never stepped) does not send the KV yet
        eng = pd_engine(folder, recorder, mode, port)
        others = [pd_engine(folder, CapturingRecorder(tmp_path), "prefill", port)] if mode == "decode" else []
    bootstrap = Bootstrap("127.0.0.1", port, 7) if mode != "null" else None
    first = TokenizedRequest("first", eng.tokenizer.encode(PROMPTS[2]), SamplingParams(max_new_tokens=40),
                             TraceContext(1, 1000, 3), bootstrap)
    if stage == "queued":  # behind another that holds the one slot
        eng.scheduler.add_request(TokenizedRequest("blocker", eng.tokenizer.encode(PROMPTS[1]),
                                                   SamplingParams(max_new_tokens=40)))
        eng.scheduler.step()
    req = eng.scheduler.add_request(first)
    reached = {"queued": lambda: req in eng.scheduler.waiting, "prefilling": lambda: 0 < req.kv_len < req.seq_len - 1,
               "decoding": lambda: len(req.output_ids) >= 3, "handed off": lambda: req in eng.scheduler.exchange.held(),
               "receiving KV": lambda: req.spans is not None and req.spans.stage == "bootstrap"}[stage]
    for _ in range(200):
        if reached():
            break
        eng.scheduler.step()
    assert reached(), stage
    assert eng.scheduler.abort(req.rid) is req and req.finish_reason == FinishReason.ABORT
    assert req.spans is None  # nothing of it left open
    mine = [s for s in recorder.named() if s["trace"] == req.trace.trace_id]
    (thread,) = [s for s in mine if s["name"].startswith("Scheduler")]
    assert thread["error"] is None and thread["attributes"]["finish_reason"] == "abort"
    assert [s["name"] for s in mine if s["parent"] == thread["id"]] == stages
    assert ("abort" in {e[0] for e in req.events}) and all(s["error"] is None for s in mine)
    for other in others:
        other.shutdown()
    eng.shutdown()


@pytest.mark.parametrize("level,expected", [(1, 0), (2, 4)])
def test_lower_levels_record_less(tiny_model_dir, tmp_path, level, expected):
    scheduler, tokenizer, recorder = traced_scheduler(tiny_model_dir, tmp_path, chunked_prefill_size=4)
    req = add(scheduler, tokenizer, 0, PROMPTS[0], level=level, max_new_tokens=5)
    while scheduler.has_work:
        scheduler.step()
    assert len(recorder.spans) == expected  # level 2: thread, queue, prefill, decode
    assert recorder.fanouts == []
    assert req.spans is None


def test_detokenizer_keeps_no_state_after_finish_or_abort(tiny_model_dir, tmp_path):
    detokenizer = DetokenizerProcess(tiny_model_dir("llama"), False, ipc.Endpoints(str(tmp_path)))
    for rid, ending in (("a", FinishReason.LENGTH), ("b", FinishReason.ABORT)):
        detokenizer.convert(ipc.RequestOutput(rid, [5], stop=None))
        detokenizer.convert(ipc.RequestOutput(rid, [6]))
        assert rid in detokenizer.states
        last = ipc.RequestOutput(rid, [] if ending == "abort" else [7], result=ipc.RequestResult(ending))
        detokenizer.convert(last)
        assert rid not in detokenizer.states
        assert last.result.text == detokenizer.tokenizer.decode([5, 6] + last.token_ids, skip_special_tokens=True)


def test_an_undecided_request_ends_with_its_verdict(tmp_path):
    control = TraceControl(level=3, sampling_ratio=0.0, keep_errors=True)
    tracer = RequestTracer(CapturingRecorder(tmp_path), control, include_content=False)
    failed, fine, declined = (tracer.start(rid, None, None, {}, wanted=wanted)
                              for rid, wanted in (("failed", None), ("fine", None), ("declined", False)))
    assert failed.ctx.decision == fine.ctx.decision == TraceDecision.UNDECIDED
    assert failed.carrier == failed.ctx and failed.ctx.traceparent.endswith("-00")  # recorded, not yet sampled
    assert declined.carrier is None
    tracer.finish(failed, None, Outcome.FAILED, "kv_transfer_failed", "no KV")
    tracer.finish(fine, None, Outcome.CANCELLED, "client_disconnected", "gone")  # kept only when asked
    tracer.finish(declined, None, Outcome.FAILED, "kv_transfer_failed", "no KV")
    recorder = tracer.recorder
    assert recorder.verdicts == [(failed.ctx.trace_id, "error"), (fine.ctx.trace_id, None)]
    assert recorder.undecided == {failed.ctx.trace_id, fine.ctx.trace_id}  # the exporter holds their spans
    assert {s["name"] for s in recorder.named()} >= {"Req failed", "Req fine"}
    assert declined.ctx.trace_id not in {s["trace"] for s in recorder.named()}
