"""Token ids to text: incremental text while a request streams, and its final text."""

from __future__ import annotations

import time

import zmq

from loupe import ipc
from loupe.core import TokenLogprob
from loupe.stops import final_text, held_back
from loupe.tracing.spans import DetokenizerTracer, open_tracer


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
        self.busy_ns = 0  # time spent converting this request's outputs
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
        end = len(self.text) - held_back(self.text, self.stop)
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent += len(delta)
        return delta

    def finish(self, new_ids: list[int], finish_reason, matched_stop) -> tuple[str, str]:
        """(last delta, whole text) once the request has ended with `new_ids`."""
        self.ids.extend(new_ids)
        final = final_text(self.tokenizer, self.ids, finish_reason, matched_stop)
        sent = self.text[: self.sent]
        delta = final[len(sent) :] if final.startswith(sent) else ""
        return delta, final


class DetokenizerProcess:
    def __init__(self, model_path: str | None, traced: bool, endpoints: ipc.Endpoints):
        from loupe.model.loader import load_tokenizer

        self.tokenizer = load_tokenizer(model_path)
        self.tracer = open_tracer(DetokenizerTracer, traced, endpoints.tracing)
        ctx = zmq.Context()
        self.tokens = ipc.bind(ctx, zmq.PULL, endpoints.detokenizer)
        if self.tracer:  # wake at least once a second to flush spans (a timeout, not a poll per message)
            self.tokens.rcvtimeo = 1000
        self.to_manager = ipc.connect(ctx, zmq.PUSH, endpoints.manager)
        self.states: dict[str, IncrementalText] = {}
        self.token_texts: dict[int, str] = {}  # token id -> its text alone (for logprobs)

    def run_forever(self) -> None:
        try:
            while True:
                try:
                    batch = ipc.recv(self.tokens)
                except zmq.Again:  # a quiet second, with tracing on
                    self.tracer.maybe_flush()
                    continue
                for out in batch.outputs:
                    self.convert(out)
                ipc.send(self.to_manager, ipc.TextBatch(batch.outputs))
                if self.tracer:
                    self.tracer.maybe_flush()
        finally:
            if self.tracer:
                self.tracer.flush()

    def convert(self, out: ipc.RequestOutput) -> None:
        """Add the text to `out`: the new text, and on the last output the whole text and the
        time this request's conversions took."""
        start = time.perf_counter_ns()
        state = self.states.get(out.rid)
        if state is None:
            state = self.states[out.rid] = IncrementalText(self.tokenizer, out.stop)
            if self.tracer:
                state.spans = self.tracer.started(out.trace, start)
        if out.logprobs:
            out.token_texts = self.texts_of(out.logprobs)
        result = out.result
        if result is None:
            out.text_delta = state.add(out.token_ids)
        else:
            out.text_delta, result.text = state.finish(out.token_ids, result.finish_reason, result.matched_stop)
            del self.states[out.rid]
        end = time.perf_counter_ns()
        state.busy_ns += end - start
        if result is not None:
            result.detokenize_seconds = state.busy_ns / 1e9
        if state.spans is not None:
            self.tracer.converted(state.spans, end, len(out.token_ids), result and result.detokenize_seconds)

    def texts_of(self, logprobs: list[TokenLogprob]) -> dict[int, str]:
        """The text of each token in `logprobs` (chosen and top), decoded alone: special tokens
        shown, a part of a multi-byte character as U+FFFD."""
        tokens = {t for lp in logprobs for t in (lp.token_id, *(top for top, _ in lp.top))}
        for token in tokens - self.token_texts.keys():
            self.token_texts[token] = self.tokenizer.decode([token])
        return {token: self.token_texts[token] for token in tokens}
