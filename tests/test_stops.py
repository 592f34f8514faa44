"""Stop rules (loupe/stops.py): when a request ends, what text is held back while it streams,
and its final text; on the tiny model's tokenizer."""

import pytest

from loupe.core import FinishReason, SamplingParams
from loupe.model.loader import load_tokenizer
from loupe.stops import StopRules, final_text, held_back

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir("llama"))


def rules(tokenizer, context_length=64):
    return StopRules(tokenizer, {EOS}, context_length)


def test_eos_stops_unless_ignored_and_stop_token_ids_always_stop(tokenizer):
    assert rules(tokenizer).check(SamplingParams(), [5, EOS], 10) == (FinishReason.STOP, EOS)
    assert rules(tokenizer).check(SamplingParams(ignore_eos=True), [5, EOS], 10) == (None, None)
    assert rules(tokenizer).check(SamplingParams(stop_token_ids=[9]), [9], 10) == (FinishReason.STOP, 9)


def test_length_ends_at_max_new_tokens_or_the_context(tokenizer):
    assert rules(tokenizer).check(SamplingParams(max_new_tokens=2), [5, 6], 10) == (FinishReason.LENGTH, None)
    assert rules(tokenizer).check(SamplingParams(max_new_tokens=2), [5], 10) == (None, None)
    assert rules(tokenizer, context_length=10).check(SamplingParams(), [5], 10) == (FinishReason.LENGTH, None)


def test_a_stop_string_in_the_recent_text_stops_naming_it(tokenizer):
    ids = tokenizer.encode("one two three")
    stop = SamplingParams(stop=["two"])
    assert rules(tokenizer).check(stop, ids, len(ids)) == (FinishReason.STOP, "two")
    assert rules(tokenizer).check(SamplingParams(stop=["four"]), ids, len(ids)) == (None, None)


@pytest.mark.parametrize("text,stop,held", [
    ("hello wo", ["world"], 2),  # "wo" may begin "world"
    ("hello", ["world"], 0),
    ("abc", ["c!", "bc?"], 2),  # the longest end that begins a stop string
    ("world", ["world"], 0),  # a whole stop string is not held back: it ends the request instead
])
def test_held_back_is_the_longest_end_that_may_start_a_stop_string(text, stop, held):
    assert held_back(text, stop) == held


def test_final_text_drops_the_stop_token_or_the_stop_string_and_after(tokenizer):
    ids = tokenizer.encode("one two three")
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert final_text(tokenizer, ids, FinishReason.LENGTH, None) == whole
    assert final_text(tokenizer, ids + [9], FinishReason.STOP, 9) == whole  # the stop token is not text
    assert final_text(tokenizer, ids, FinishReason.STOP, "two") == whole[: whole.index("two")]
