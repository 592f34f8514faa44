"""Building blocks shared by every model family: rotary embedding, attention, MLP (norms: nn.RMSNorm).

Every forward works on a flat batch of tokens `[num_tokens, hidden]`; only attention needs
to know which tokens belong to which request, and it asks the `ForwardBatch` for that.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from loupe.distributed.parallel import Comm
from loupe.model.attention import ForwardBatch
from loupe.model.config import ModelConfig


class Linear(nn.Linear):
    """Every linear layer of a model is called with `exact`: whether the forward pass prefills,
    when quantized layers (model/quant.py) take their exact path; float ones are exact anyway."""

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        return super().forward(x)


class PackedLinear(nn.Module):
    """A linear layer whose weight oneDNN has reordered into its blocked layout once, at load.
    On CPU its matmuls run 2-3x faster than `F.linear`'s (MKL) for the short, wide inputs of
    decoding, weights being streamed from memory every step; the numerics stay float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        bound_matmul_caches()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # laid out for ~32-row inputs
        self.bias = bias

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


@torch.library.custom_op("loupe::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PackedLinear's matmul as one opaque op for torch.compile, whose own lowering of it takes
    only weights it may fold into the graph as constants."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# oneDNN, and ideep above it, keep the matmul they build for each input shape, 1024 of each
# by default at 0.6 MB or more apiece. Nearly every prefill step has a row count of its own,
# so a serving scheduler grew by 0.4 GB in 20 minutes and was still growing (BENCHMARKS.md,
# soak); decoding reuses a few shapes every step, which stay in a smaller cache at no cost.
MATMUL_CACHE_CAPACITY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}


def bound_matmul_caches() -> None:
    """Bound oneDNN's shape caches unless the environment sets them. Both libraries read the
    variables once, when they build their first primitive (a weight's reorder counts): a later
    setting is silently ignored, as it was while the int4 layers were packed first."""
    for name, capacity in MATMUL_CACHE_CAPACITY.items():
        os.environ.setdefault(name, capacity)


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of a CPU model for a PackedLinear; how many were swapped."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                count += 1
    return count


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, smoothed, inv_freq)
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, looked up once per forward and shared by all layers."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(config))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def tp_size_problem(config: ModelConfig, tp_size: int) -> str | None:
    """Why the model cannot be split over `tp_size` ranks, or None when it can."""
    heads, kv_heads = config.num_heads, config.num_kv_heads
    if heads % tp_size:
        return f"must divide the model's {heads} attention heads"
    if kv_heads % tp_size and tp_size % kv_heads:
        return f"and the model's {kv_heads} KV heads must divide one another"
    if config.intermediate_size % tp_size:
        return f"must divide the model's MLP size {config.intermediate_size}"
    return None


def local_heads(config: ModelConfig, tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) of one tensor-parallel rank. KV heads are split when tp_size
    divides them and replicated when they divide tp_size; anything else is refused."""
    problem = tp_size_problem(config, tp_size)
    if problem:
        fits = [n for n in range(1, config.num_heads + 1) if tp_size_problem(config, n) is None]
        raise ValueError(f"--tp-size {tp_size} {problem} (sizes that fit: {', '.join(map(str, fits))})")
    return config.num_heads // tp_size, max(1, config.num_kv_heads // tp_size)


class Attention(nn.Module):
    """Column-parallel q/k/v (this rank's heads), row-parallel output (summed over ranks)."""

    def __init__(self, config: ModelConfig, layer_id: int, comm: Comm, qk_norm: bool = False):
        super().__init__()
        self.layer_id = layer_id  # index into this stage's KV cache
        self.comm = comm
        self.num_heads, self.num_kv_heads = local_heads(config, comm.ranks.tp_size)
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v in one matmul: fewer kernel launches per layer.
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # q and k side by side as one [tokens, heads + kv_heads, head_dim]: one rotary for both.
        qk, v = self.qkv_proj(x, batch.exact).view(len(x), -1, self.head_dim).split(
            [self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :self.num_heads]), self.k_norm(qk[:, self.num_heads:])], dim=1)
        q, k = apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return self.comm.all_reduce(self.o_proj(batch.attention(self.layer_id, q, k, v), batch.exact))


class MLP(nn.Module):
    """Column-parallel gate/up, row-parallel down (summed over ranks)."""

    def __init__(self, config: ModelConfig, comm: Comm):
        super().__init__()
        self.comm = comm
        size = config.intermediate_size // comm.ranks.tp_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * size, bias=False)
        self.down_proj = Linear(size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, exact).chunk(2, dim=-1)
        return self.comm.all_reduce(self.down_proj(F.silu(gate) * up, exact))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, comm: Comm, qk_norm: bool = False):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_id, comm, qk_norm)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, comm)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return x + self.mlp(self.post_attention_layernorm(x), batch.exact)


def vocab_shard_size(vocab_size: int, tp_size: int) -> int:
    """Rows of the embedding and LM head per tensor-parallel rank (the last rank's are padded)."""
    return -(-vocab_size // tp_size)


class VocabParallelEmbedding(nn.Module):
    """Each tensor-parallel rank holds a contiguous slice of the vocabulary's rows; a token's
    embedding comes from the rank that holds it (the others add zeros)."""

    def __init__(self, vocab_size: int, hidden_size: int, comm: Comm):
        super().__init__()
        self.comm = comm
        rows = vocab_shard_size(vocab_size, comm.ranks.tp_size)
        self.start = comm.ranks.tp_rank * rows
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.ranks.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine.unsqueeze(-1)
        return self.comm.all_reduce(x)


class ParallelLMHead(nn.Module):
    """Each tensor-parallel rank scores its slice of the vocabulary; the slices are gathered."""

    def __init__(self, vocab_size: int, hidden_size: int, comm: Comm):
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.proj = Linear(hidden_size, vocab_shard_size(vocab_size, comm.ranks.tp_size), bias=False)

    def forward(self, hidden: torch.Tensor, exact: bool = False) -> torch.Tensor:
        return self.comm.all_gather(self.proj(hidden, exact))[..., : self.vocab_size]
