"""Llama-family decoder (Llama 2/3, SmolLM, Mistral); Qwen2 and Qwen3 are small variations of it."""

from __future__ import annotations

import torch
from torch import nn

from loupe.distributed.parallel import Comm, Ranks, stage_layers
from loupe.model.attention import ForwardBatch
from loupe.model.config import ModelConfig
from loupe.model.layers import (
    DecoderLayer,
    ParallelLMHead,
    RotaryEmbedding,
    VocabParallelEmbedding,
    local_heads,
    vocab_shard_size,
)

# Hugging Face checkpoint names that loupe stores fused: (our name, shard index).
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """One pipeline stage (all of the model when pp_size is 1) of one tensor-parallel rank:
    the embedding on the first stage, the final norm and LM head on the last."""

    qk_norm = False

    def __init__(self, config: ModelConfig, max_positions: int, comm: Comm | None = None):
        super().__init__()
        self.config = config
        self.comm = comm = comm or Comm(Ranks())
        ranks = comm.ranks
        if config.num_layers < ranks.pp_size:
            raise ValueError(f"--pp-size {ranks.pp_size} is more than the model's {config.num_layers} layers")
        self.layer_range = stage_layers(config.num_layers, ranks.pp_size, ranks.pp_rank)
        first, last = ranks.is_first_stage, ranks.is_last_stage
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, comm) if first else None
        self.rotary = RotaryEmbedding(config, max_positions)
        self.layers = nn.ModuleList(DecoderLayer(config, i, comm, self.qk_norm) for i in range(len(self.layer_range)))
        self.norm = nn.RMSNorm(config.hidden_size, config.rms_norm_eps) if last else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, comm) if last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of every token, `[num_tokens, hidden]`: from the token ids on the first
        stage, from the previous stage's `hidden` on the others; normed on the last stage."""
        x = self.embed_tokens(input_ids) if hidden is None else hidden
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, batch)
        return self.norm(x) if self.norm is not None else x

    def compute_logits(self, hidden: torch.Tensor, exact: bool = False) -> torch.Tensor:
        return self.lm_head(hidden, exact).float()

    def load_weights(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str) -> None:
        """Take a Hugging Face-named state dict, keeping this rank's layers and slices and fusing
        q/k/v and gate/up. The model may be built on the meta device: every parameter is
        replaced, none is copied into."""
        expected = dict(self.named_parameters())
        tied = self.config.tie_word_embeddings
        if tied and self.embed_tokens is not None:
            expected.pop("lm_head.proj.weight", None)
        shards: dict[str, dict[int, torch.Tensor]] = {}
        for hf_name, tensor in state_dict.items():
            name = self._local_name(hf_name.removeprefix("model."))
            if name is None:
                continue
            tensor = self._tp_slice(name, tensor)
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
        if tied and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.proj.weight = self.embed_tokens.weight

    def _local_name(self, name: str) -> str | None:
        """This stage's name for a checkpoint weight; None for another stage's weight."""
        tied = self.config.tie_word_embeddings
        if "rotary_emb" in name:
            return None
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            local = int(index) - self.layer_range.start
            return f"layers.{local}.{rest}" if 0 <= local < len(self.layer_range) else None
        if name == "embed_tokens.weight":
            if self.embed_tokens is not None:
                return name
            return "lm_head.proj.weight" if tied and self.lm_head is not None else None
        if name == "lm_head.weight":
            return None if tied or self.lm_head is None else "lm_head.proj.weight"
        if name == "norm.weight" and self.norm is None:
            return None
        return name

    def _tp_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This tensor-parallel rank's slice of a full checkpoint weight: a copy, not a view that
        would keep the whole alive."""
        tp, rank, part = self.comm.ranks.tp_size, self.comm.ranks.tp_rank, name.split(".")[-2]
        if tp == 1:
            return tensor
        if part in ("embed_tokens", "proj"):  # vocabulary rows, the last slice padded with zeros
            rows = vocab_shard_size(self.config.vocab_size, tp)
            piece = tensor[rank * rows : (rank + 1) * rows]
            return torch.cat([piece, piece.new_zeros(rows - len(piece), *piece.shape[1:])])
        if part in ("k_proj", "v_proj"):  # this rank's KV heads, shared by ranks when replicated
            _, kv_heads = local_heads(self.config, tp)
            first = rank // max(1, tp // self.config.num_kv_heads) * kv_heads
            return tensor[first * self.config.head_dim : (first + kv_heads) * self.config.head_dim].clone()
        if part in ("q_proj", "gate_proj", "up_proj"):  # column-parallel: output rows
            return tensor.chunk(tp, dim=0)[rank].clone()
        if part in ("o_proj", "down_proj"):  # row-parallel: input columns
            return tensor.chunk(tp, dim=1)[rank].clone()
        return tensor  # norms: every rank holds them whole

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
