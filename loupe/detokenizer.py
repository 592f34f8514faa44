"""Token ids to text: the final text of a request, and incremental text while it streams."""

from __future__ import annotations

from loupe.scheduler.request import FinishReason


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
