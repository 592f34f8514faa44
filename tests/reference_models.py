"""transformers' own model on the bundled checkpoint's weights: the reference loupe must match."""

from __future__ import annotations

import transformers

from loupe.model.gguf_loader import bundled_model_path
from loupe.model.loader import read_checkpoint


def bundled_reference() -> tuple[transformers.LlamaForCausalLM, object]:
    """(float32 transformers model, tokenizer) of the bundled SmolLM2 GGUF, dequantised as loupe loads it."""
    hf_config, state_dict, tokenizer = read_checkpoint(bundled_model_path())
    config = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "architectures"})
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict(state_dict, strict=False)
    reference.tie_weights()
    return reference, tokenizer
