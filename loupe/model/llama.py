"""Llama-family decoder (Llama 2/3, SmolLM, Mistral); Qwen2 and Qwen3 are small variations of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from loupe.model.config import ModelConfig
from loupe.model.layers import DecoderLayer, RMSNorm, RotaryEmbedding

if TYPE_CHECKING:
    from loupe.runner.attention import ForwardBatch

# Hugging Face checkpoint names that loupe stores fused: (our name, shard index).
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

    def load_weights(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str) -> None:
        """Take a Hugging Face-named state dict, fusing q/k/v and gate/up. The model may be
        built on the meta device: every parameter is replaced, none is copied into."""
        expected = dict(self.named_parameters())
        if self.config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        shards: dict[str, dict[int, torch.Tensor]] = {}
        for hf_name, tensor in state_dict.items():
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            part = next((p for p in FUSED if f".{p}." in name), None)
            if part is not None:
                fused, index = FUSED[part]
                shards.setdefault(name.replace(part, fused), {})[index] = tensor
            else:
                self._set_parameter(expected, name, tensor, hf_name, dtype, device)
        for name, parts in shards.items():
            if sorted(parts) != list(range(3 if "qkv" in name else 2)):
                raise ValueError(f"checkpoint has only some of the parts of {name!r}")
            fused = torch.cat([parts[i] for i in sorted(parts)])
            self._set_parameter(expected, name, fused, name, dtype, device)
        if expected:
            raise ValueError(f"checkpoint lacks weights: {', '.join(sorted(expected)[:5])}")
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _set_parameter(self, expected: dict, name: str, tensor: torch.Tensor, source: str,
                       dtype: torch.dtype, device: torch.device | str) -> None:
        if name not in expected:
            raise ValueError(f"unexpected weight {source!r} in checkpoint")
        shape = tuple(expected.pop(name).shape)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"weight {source!r} has shape {tuple(tensor.shape)}, expected {shape}")
        module_name, _, attr = name.rpartition(".")
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        setattr(self.get_submodule(module_name), attr, param)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with a bias on q/k/v (set through `ModelConfig.attention_bias`)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with RMSNorm on each head of q and k before the rotary embedding."""

    qk_norm = True


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}
