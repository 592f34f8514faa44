"""The detokenizer (loupe/detokenizer.py): streamed text equals the final text, half a
multi-byte character waits for the rest, and a possible stop string is held back."""

import pytest

from loupe import ipc
from loupe.core import FinishReason
from loupe.detokenizer import DetokenizerProcess, IncrementalText
from loupe.model.loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir("llama"))


def test_streamed_deltas_add_up_to_the_final_text(tokenizer):
    ids = tokenizer.encode("Streaming text, token by token: ça marche 🙂 fine.")
    text = IncrementalText(tokenizer, None)
    deltas = [text.add([token]) for token in ids[:-1]]
    last, final = text.finish(ids[-1:], FinishReason.LENGTH, None)
    assert "".join(deltas) + last == final == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)  # half a character is never sent


def test_a_possible_stop_string_is_held_back_then_cut(tokenizer):
    ids = tokenizer.encode("say the magic word")
    # The tokens before the stop string is whole (the scheduler ends the request at that token).
    k = max(n for n in range(len(ids)) if "magic word" not in tokenizer.decode(ids[:n]))
    assert "magic" in tokenizer.decode(ids[:k])
    text = IncrementalText(tokenizer, ["magic word"])
    sent = "".join(text.add([token]) for token in ids[:k])
    assert "magic" not in sent  # held back: it may be the start of the stop string
    last, final = text.finish(ids[k:], FinishReason.STOP, "magic word")
    assert sent + last == final == tokenizer.decode(ids, skip_special_tokens=True).split("magic word")[0]


def test_convert_adds_text_and_token_texts_and_forgets_a_finished_request(tiny_model_dir, tmp_path, tokenizer):
    detokenizer = DetokenizerProcess(tiny_model_dir("llama"), False, ipc.Endpoints(str(tmp_path)))
    ids = tokenizer.encode("hello there")
    first = ipc.RequestOutput("r", ids[:1], stop=[])
    detokenizer.convert(first)
    last = ipc.RequestOutput("r", ids[1:], result=ipc.RequestResult(FinishReason.LENGTH))
    detokenizer.convert(last)
    assert first.text_delta + last.text_delta == last.result.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert last.result.detokenize_seconds > 0 and "r" not in detokenizer.states
