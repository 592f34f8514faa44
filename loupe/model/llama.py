"""Llama-family decoder (Llama 2/3, SmolLM, Mistral); Qwen2 and Qwen3 are small variations of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from loupe.model.config import ModelConfig
from loupe.model.layers import DecoderLayer, RMSNorm, RotaryEmbedding

if TYPE_CHECKING:
    from loupe.runner.attention import ForwardBatch

# Hugging Face checkpoint names that loupe stores fused: (our name, shard index, shard count).
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    qk_norm = False

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config, max_positions)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.qk_norm) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states of every token, `[num_tokens, hidden]`."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, batch)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a Hugging Face-named state dict in, fusing q/k/v and gate/up as it goes."""
        params = dict(self.named_parameters())
        seen = set()
        for hf_name, tensor in state_dict.items():
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            shard = None
            for part, (fused, index) in FUSED.items():
                if f".{part}." in name:
                    name, shard = name.replace(part, fused), index
                    break
            if name not in params:
                raise ValueError(f"unexpected weight {hf_name!r} in checkpoint")
            target = params[name].data
            if shard is not None:
                target = target.narrow(0, self._shard_offset(name, shard), tensor.shape[0])
            if target.shape != tensor.shape:
                raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            target.copy_(tensor)
            seen.add((name, shard))
        missing = [n for n, p in params.items() if not any(s[0] == n for s in seen)]
        if self.config.tie_word_embeddings:
            missing = [n for n in missing if n != "lm_head.weight"]
        if missing:
            raise ValueError(f"checkpoint lacks weights: {', '.join(missing[:5])}")

    def _shard_offset(self, name: str, shard: int) -> int:
        c = self.config
        if "qkv_proj" in name:
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return [0, q, q + kv][shard]
        return shard * c.intermediate_size


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with a bias on q/k/v (set through `ModelConfig.attention_bias`)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with RMSNorm on each head of q and k before the rotary embedding."""

    qk_norm = True


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}
