"""Token ids to text: the final text of a request, and incremental text while it streams."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection

import zmq

from loupe import ipc
from loupe.process import setup_child
from loupe.scheduler.request import FinishReason
from loupe.tracing.recorder import Recorder
from loupe.tracing.spans import DetokenizerSpans, DetokenizerTracer


def output_text(tokenizer, output_ids: list[int], finish_reason: FinishReason | None, matched_stop) -> str:
    """The text a client sees: without the stop token or stop string that ended it."""
    ids = output_ids
    if finish_reason == FinishReason.STOP and isinstance(matched_stop, int):
        ids = output_ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if isinstance(matched_stop, str):
        cut = text.find(matched_stop)
        text = text[:cut] if cut >= 0 else text
    return text


class IncrementalText:
    """Text of one request as its tokens arrive. Text that could be the start of a stop string
    is held back until it is known not to be one, so a stream never shows a stop string."""

    def __init__(self, tokenizer, stop: list[str] | None):
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already sent
        self.prefix_offset = 0  # tokens before this are decoded for good
        self.read_offset = 0
        self.spans = None  # tracing.spans.DetokenizerSpans of a traced request

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text that can be sent now."""
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        # A trailing U+FFFD is half a multi-byte character: wait for the rest.
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        end = len(self.text) - self._held_back()
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent += len(delta)
        return delta

    def finish(self, finish_reason, matched_stop) -> tuple[str, str]:
        """(last delta, whole text) once the request has ended."""
        final = output_text(self.tokenizer, self.ids, finish_reason, matched_stop)
        sent = self.text[: self.sent]
        delta = final[len(sent) :] if final.startswith(sent) else ""
        return delta, final

    def _held_back(self) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest


class DetokenizerProcess:
    def __init__(self, args, ipc_dir: str):
        from loupe.model.loader import load_tokenizer

        self.tokenizer = load_tokenizer(args.model_path)
        self.tracer = None
        if args.enable_tracing:
            self.tracer = DetokenizerTracer(Recorder(ipc.endpoint(ipc_dir, "tracing"), "Detokenizer"))
        ctx = zmq.Context()
        self.tokens = ipc.bind(ctx, zmq.PULL, ipc.endpoint(ipc_dir, "detokenizer"))
        self.to_manager = ipc.connect(ctx, zmq.PUSH, ipc.endpoint(ipc_dir, "manager"))
        self.states: dict[str, IncrementalText] = {}

    def run_forever(self) -> None:
        try:
            while True:
                if self.tracer and not self.tokens.poll(1000):
                    self.tracer.recorder.maybe_flush()
                    continue
                batch = ipc.recv(self.tokens)
                ipc.send(self.to_manager, ipc.TextBatch([self.convert(o) for o in batch.outputs]))
                if self.tracer:
                    self.tracer.recorder.maybe_flush()
        finally:
            if self.tracer:
                self.tracer.recorder.flush()

    def convert(self, out: ipc.RequestOutput) -> ipc.TextOutput:
        start = time.perf_counter_ns()
        state = self.states.get(out.rid)
        if state is None:
            state = self.states[out.rid] = IncrementalText(self.tokenizer, out.stop)
            if self.tracer and out.trace is not None and out.trace.level >= 2:
                state.spans = DetokenizerSpans(out.trace, start)
        final_text = None
        if out.finish_reason is None:
            delta = state.add(out.new_token_ids)
        else:
            state.ids.extend(out.new_token_ids)
            delta, final_text = state.finish(FinishReason(out.finish_reason), out.matched_stop)
            del self.states[out.rid]
        if state.spans is not None:
            self.tracer.on_convert(state.spans, start, time.perf_counter_ns(), len(out.new_token_ids),
                                   out.finish_reason is not None)
        return ipc.TextOutput(
            rid=out.rid, text_delta=delta, token_ids=out.new_token_ids, finish_reason=out.finish_reason,
            matched_stop=out.matched_stop, prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens,
            queue_seconds=out.queue_seconds, error=out.error, text=final_text,
            prefill_seconds=out.prefill_seconds, decode_seconds=out.decode_seconds, events=out.events,
        )


def run_detokenizer_process(args, ipc_dir: str, ready: Connection) -> None:
    setup_child("detokenizer", args.log_level)
    try:
        proc = DetokenizerProcess(args, ipc_dir)
    except Exception as e:
        ready.send({"error": f"{type(e).__name__}: {e}"})
        return
    ready.send({})
    proc.run_forever()
