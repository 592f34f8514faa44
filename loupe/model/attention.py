"""Attention over the paged KV cache.

The model runs on a flat list of new tokens. Decoding requests (one new token each) come
first, prefill chunks after. Each layer writes the new tokens' K/V into their slots, then
gathers every request's K/V by its slot table and runs `scaled_dot_product_attention`:
one call for all decodes and one for all prefill chunks, padded to the longest request
and masked.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def layered_zeros(shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device | str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Zeros, and a tensor for each index of the first dimension over the same memory. On CPU
    they live in an anonymous memory map, which the OS fills with zeros only when a page is
    first written: a KV cache then costs the memory it holds, not its size. There each layer's
    tensor has a storage of its own (not a view of the whole), so that torch.compile sees the
    layers as independent inputs, each written in place, rather than views of one tensor
    (whose in-place writes it compiles into copies of the whole)."""
    if torch.device(device).type != "cpu":
        whole = torch.zeros(shape, dtype=dtype, device=device)
        return whole, list(whole.unbind(0))
    count, per_layer = math.prod(shape), math.prod(shape[1:])
    buffer = mmap.mmap(-1, count * dtype.itemsize)
    whole = torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)
    layers = [torch.frombuffer(buffer, dtype=dtype, count=per_layer, offset=i * per_layer * dtype.itemsize)
              .view(shape[1:]) for i in range(shape[0])]
    return whole, layers


class KVCache:
    """K and V for every token slot of every layer: `k` and `v` whole, `k_layers[i]` and
    `v_layers[i]` one layer's (the same memory). Slot 0 is never handed out: it stays zero and
    serves as padding in slot tables."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k, self.k_layers = layered_zeros(shape, dtype, device)
        self.v, self.v_layers = layered_zeros(shape, dtype, device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


@dataclass
class AttentionGroup:
    """Requests attended together: their slot tables padded to the longest, and the mask."""

    slots: torch.Tensor  # [B, K] slot of each key position
    mask: torch.Tensor | None  # [B, 1, Q, K] True where a query may see a key; None: all
    query_index: torch.Tensor | None  # [T] where each flat query goes in the padded [B*Q]
    num_queries: int  # Q


@dataclass
class ForwardBatch:
    kv: KVCache
    out_slots: torch.Tensor  # [T] slot where each new token's K/V is written
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode: AttentionGroup | None
    prefill: AttentionGroup | None
    prefill_is_causal: bool  # one prefill with no cached prefix: attend its own K/V directly
    exact: bool  # a pass that prefills: quantized layers take their exact path (model/quant.py)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv.k_layers[layer], self.kv.v_layers[layer]
        k_cache[self.out_slots] = k
        v_cache[self.out_slots] = v
        n = self.num_decode
        outs = []
        if self.decode is not None:
            outs.append(self._attend(self.decode, q[:n], k_cache, v_cache))
        if self.prefill_is_causal:
            outs.append(_sdpa(q[n:].unsqueeze(0), k[n:].unsqueeze(0), v[n:].unsqueeze(0), None, True)[0])
        elif self.prefill is not None:
            outs.append(self._attend(self.prefill, q[n:], k_cache, v_cache))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.flatten(1)

    @staticmethod
    def _attend(group: AttentionGroup, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        if group.query_index is None and torch.compiler.is_compiling():
            return _attend_by_slot(q, group.slots, group.mask, k_cache, v_cache)
        b, length = group.slots.shape
        # index_select copies whole slots (~5x faster than indexing, which copies by element)
        flat = group.slots.flatten()
        keys = k_cache.index_select(0, flat).view(b, length, *k_cache.shape[1:])  # [B, K, kv_heads, D]
        values = v_cache.index_select(0, flat).view(b, length, *v_cache.shape[1:])
        if group.query_index is None:  # one query per request
            queries = q.unsqueeze(1)
        else:
            queries = q.new_zeros(b * group.num_queries, *q.shape[1:])
            queries[group.query_index] = q
            queries = queries.view(b, group.num_queries, *q.shape[1:])
        out = _sdpa(queries, keys, values, group.mask, False)
        out = out.flatten(0, 1)
        return out if group.query_index is None else out[group.query_index]


def _attend_by_slot(q: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None, k_cache: torch.Tensor,
                    v_cache: torch.Tensor) -> torch.Tensor:
    """One query per request ([B, H, D]) against its keys, written as the sums they are so that
    the compiler fuses the whole of it into one loop nest that reads each key and value from its
    slot in the cache: no gathered copy of the keys, no call out of the compiled step.
    SDPA's CPU kernel, for one query, costs as much again as the arithmetic (BENCHMARKS.md)."""
    b, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    q = q.view(b, 1, kv_heads, heads // kv_heads, dim) * dim ** -0.5
    keys, values = k_cache[slots].unsqueeze(3), v_cache[slots].unsqueeze(3)  # [B, K, kv_heads, 1, D]
    scores = (q * keys).sum(-1)  # [B, K, kv_heads, group]
    if mask is not None:  # [B, 1, 1, K]
        scores = scores.masked_fill(~mask.view(b, -1, 1, 1), float("-inf"))
    weights = scores.softmax(1).unsqueeze(-1)
    return (weights * values).sum(1).reshape(b, heads, dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """[B, Q, H, D] x [B, K, Hkv, D] -> [B, Q, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=causal, enable_gqa=True,
    )
    return out.transpose(1, 2)
