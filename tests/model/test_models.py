"""loupe's models against transformers' own implementation of the same checkpoints."""

import pytest
import torch
import transformers

from harness.reference_models import loupe_step_logits
from loupe import Engine

from tiny_models import FAMILIES, write_tiny_model


def reference_logits(folder: str, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        full = model(torch.tensor([prompt + steps])).logits[0]
    n = len(prompt)
    return [full[:n]] + [full[n + i : n + i + 1] for i in range(len(steps))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    scheduler = Engine(folder, dtype="float32", page_size=4, max_total_tokens=256).scheduler
    prompt = scheduler.worker.tokenizer.encode("The capital of France is Paris. Hello, my name is")
    steps = [5, 17, 42, 99, 3]
    ours = loupe_step_logits(scheduler, prompt, steps)
    theirs = reference_logits(folder, prompt, steps)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    engine = Engine(folder, dtype="float32", page_size=4, chunked_prefill_size=8)
    prompts = ["The capital of France is", "one two three", "Where did the time of this request go?"]
    outs = engine.generate(prompts, {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True})
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = engine.tokenizer.encode(prompt)
        expected = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out["output_ids"] == expected


def test_sharded_checkpoint_loads(tmp_path):
    folder = write_tiny_model(str(tmp_path / "sharded"), "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(folder, max_shard_size="100KB")
    import os

    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    a = Engine(folder, dtype="float32").generate("one two", {"max_new_tokens": 8, "temperature": 0})
    ids = transformers.AutoTokenizer.from_pretrained(folder).encode("one two")
    expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert a["output_ids"] == expected
