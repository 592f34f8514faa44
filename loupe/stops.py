"""When a request stops, and what of its text a client sees: all of stop handling.

    scheduler      StopRules.check after every token: EOS, a stop token id, max_new_tokens,
                   the context length, a stop string in the recent text
    detokenizer    held_back while streaming: text that may be the start of a stop string waits
    final text     final_text: without the stop token, or the stop string and what follows it
"""

from __future__ import annotations

from loupe.core import FinishReason, SamplingParams


class StopRules:
    """The stop conditions of one served model."""

    def __init__(self, tokenizer, eos_ids: set[int], context_length: int):
        self.tokenizer, self.eos_ids, self.context_length = tokenizer, eos_ids, context_length

    def check(self, sampling: SamplingParams, output_ids: list[int], seq_len: int
              ) -> tuple[FinishReason | None, int | str | None]:
        """(why the request ends now, the stop token or string that ended it); (None, None)
        while it goes on. Call after each new token, the last of `output_ids`."""
        token = output_ids[-1]
        if (token in self.eos_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            return FinishReason.STOP, token
        if len(output_ids) >= sampling.max_new_tokens or seq_len >= self.context_length:
            return FinishReason.LENGTH, None
        if sampling.stop:
            window = max(len(s) for s in sampling.stop) + 2
            tail = self.tokenizer.decode(output_ids[-window:])
            for s in sampling.stop:
                if s in tail:
                    return FinishReason.STOP, s
        return None, None


def held_back(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def final_text(tokenizer, output_ids: list[int], finish_reason: FinishReason | None, matched_stop) -> str:
    """The text a client sees: without the stop token or stop string that ended it."""
    stop_token = finish_reason == FinishReason.STOP and isinstance(matched_stop, int)
    text = tokenizer.decode(output_ids[:-1] if stop_token else output_ids, skip_special_tokens=True)
    return text.partition(matched_stop)[0] if isinstance(matched_stop, str) else text
