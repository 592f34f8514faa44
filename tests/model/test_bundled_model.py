"""The bundled SmolLM2-135M-Instruct GGUF: loupe against transformers on the same weights."""

import time

import pytest
import torch

from harness.reference_models import bundled_reference, loupe_step_logits
from loupe import Engine

pytestmark = pytest.mark.slow  # the bundled model, in process


def test_bundled_model_matches_transformers():
    started = time.perf_counter()
    engine = Engine(dtype="float32", quantization="none")  # the exact path
    load_seconds = time.perf_counter() - started
    reference, tokenizer = bundled_reference()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 32, "temperature": 0, "ignore_eos": True})
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        full = reference(torch.tensor([prompt + out["output_ids"]])).logits[0]
    assert out["output_ids"] == expected
    assert "Paris" in out["text"]

    # Logits of the prompt's last position and of a few decode steps, through the paged cache.
    steps = loupe_step_logits(engine.scheduler, prompt, out["output_ids"][:3])
    worst = max((logits[-1] - full[len(prompt) - 1 + step]).abs().max().item() for step, logits in enumerate(steps))
    assert worst <= 1e-3
    assert load_seconds < 30  # seconds, not tens of seconds (generous for a loaded CI machine)
