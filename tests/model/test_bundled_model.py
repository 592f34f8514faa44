"""The bundled SmolLM2-135M-Instruct GGUF: loupe against transformers on the same weights."""

import time

import torch
from reference_models import bundled_reference

from loupe import Engine
from loupe.core import SamplingParams, TokenizedRequest
from loupe.scheduler.request import Req


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
    s = engine.scheduler
    req = Req(TokenizedRequest("logits", prompt, SamplingParams(max_new_tokens=8)), seed=0)
    assert s.kv.admit(req)
    worst = 0.0
    for step in range(4):
        n = req.seq_len - req.kv_len if step == 0 else 1  # the cache may hold part of the prompt
        if step:
            req.output_ids.append(out["output_ids"][step - 1])
        assert s.kv.grow(req, req.kv_len + n)
        batch, ids, pos = s.worker.runner._prepare([req], [n])
        with torch.inference_mode():
            logits = s.worker.runner.model.compute_logits(s.worker.runner.model(ids, pos, batch)[-1:])
        req.kv_len += n
        worst = max(worst, (logits[0] - full[len(prompt) - 1 + step]).abs().max().item())
    s.kv.release(req, cache=False)
    assert worst <= 1e-3
    assert load_seconds < 30  # seconds, not tens of seconds (generous for a loaded CI machine)
