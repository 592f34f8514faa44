"""Weight-only int4 linears for CPU decoding: 4-bit weights in groups of 32 along the input,
each group with a scale and a zero, multiplied by loupe's VNNI kernel (model/kernels.py) where
the CPU has AVX-512 VNNI, else by PyTorch's int4 CPU kernel.

Decoding one token reads every weight once, so on a CPU its speed is memory bandwidth over
weight bytes: int4 groups read ~0.6-0.75 byte a weight against float32's 4. The groups are those
of GGUF's Q4_0 and Q4_1 (32 weights, a scale and a minimum), and Q4_1's quantiser puts the
smallest weight of a group on 0 and the largest on 15, so quantising a dequantised Q4_1 tensor
again finds the file's own grid: loupe computes from the checkpoint's quantised weights.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from loupe.model.kernels import cpu_flags, int4_vnni_available, int4_vnni_linear, pack_int4_blocks
from loupe.model.layers import PackedLinear

GROUP = 32
LEVELS = 15  # 4 bits: 0..15
INT4_MAX_ROWS = 16  # more rows than this go through the exact copy (measured: BENCHMARKS.md, int4 weights)


def int4_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int8_supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


@functools.cache
def bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), where oneDNN's
    bfloat16 matmul has about twice float32's arithmetic; elsewhere it would emulate it."""
    return torch.backends.mkldnn.is_available() and bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4-bit codes 0..15 `[out, in]`, scales and zeros `[in / 32, out, 2]`) of a float weight,
    min-max per group; the kernel's weight is `(code - 8) * scale + zero`."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
    codes = ((groups - low) / scale).round().clamp(0, LEVELS).to(torch.int32).reshape(out_features, in_features)
    zero = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return codes, scales_and_zeros


def dequantize_int4(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The float weight that `quantize_int4`'s output stands for."""
    out_features, in_features = codes.shape
    scale, zero = scales_and_zeros.transpose(0, 1).unsqueeze(-2).unbind(-1)
    groups = codes.reshape(out_features, in_features // GROUP, GROUP).float()
    return ((groups - 8) * scale + zero).reshape(out_features, in_features)


class Int4Linear(nn.Module):
    """A linear layer whose decode steps multiply int4 groups and whose prefill takes the same
    grid in the model's dtype, exact. Where the CPU has AVX-512 VNNI, every decode step goes
    through loupe's own kernel (model/kernels.py: 8-bit activations, integer dot products),
    faster than the alternatives at any number of rows measured (BENCHMARKS.md, int4 weights).
    Elsewhere PyTorch's int4 kernel takes up to INT4_MAX_ROWS rows (reading the weights is the
    cost) and wider steps go through oneDNN (arithmetic is the cost, and PyTorch's kernel unpacks
    the weights again for every four rows): from a bfloat16 copy of the grid where the CPU has
    bfloat16 arithmetic (`bf16_native`: twice float32's), else from the exact one.

    A forward pass that prefills calls it `exact` (model/attention.py ForwardBatch): then it
    multiplies by the exact copy whatever the row count, so a prompt's first token comes out
    the same whether its prefix was cached (a few rows left to compute) or not (many)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        codes, scales_and_zeros = quantize_int4(linear.weight.detach())
        self.vnni = self.packed = self.scales_and_zeros = self.wide_decode = None
        weight = dequantize_int4(codes, scales_and_zeros)
        if int4_vnni_available():
            scale, zero = scales_and_zeros.unbind(-1)  # [in / 32, out]: w = (code - 8) * scale + zero
            self.vnni = pack_int4_blocks(codes, scale.t(), (zero - 8 * scale).t())
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self.scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
            if bf16_native() and linear.weight.dtype == torch.float32:
                self.wide_decode = PackedLinear(weight.to(torch.bfloat16), None)
        self.wide = PackedLinear(weight.to(linear.weight.dtype), linear.bias)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        wide = flat.shape[0] > INT4_MAX_ROWS
        if exact or (self.vnni is None and wide and self.wide_decode is None):
            return self.wide(x)
        if self.vnni is not None:
            y = int4_vnni_linear(flat.float().contiguous(), self.vnni)
        elif wide:
            y = self.wide_decode(flat.to(torch.bfloat16))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, GROUP,
                                                            self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """The LM head from 8-bit weights, one scale per output row, for decode steps: 49,152 x 576
    weights are 28 MB to read for a token instead of 113. Each step's activations are quantized
    to 8 bits (one scale and zero point for the step) and oneDNN multiplies them with integer
    dot products, as llama.cpp does with its 8-bit blocks. A forward pass that prefills takes
    the exact float32 path (`wide`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        codes = (weight / self.scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(codes, [1, weight.shape[1]])
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.int32)
        self.wide = PackedLinear(linear.weight, linear.bias)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        if exact:
            return self.wide(x)
        flat = x.reshape(-1, x.shape[-1]).float()
        low, high = flat.aminmax()
        scale = ((high.clamp(min=0) - low.clamp(max=0)) / 255).clamp(min=torch.finfo(torch.float32).tiny)
        zero = (-low.clamp(max=0) / scale).round().to(torch.int32)
        codes = (flat / scale + zero).round_().clamp_(0, 255).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise.tensor(codes, scale, zero, self.packed, self.scales, self.zero_points,
                                                      self.bias, 1.0, 0, x.dtype, "none", [], "")
        return y.reshape(*x.shape[:-1], -1)


def quantizable(linear: nn.Module) -> bool:
    if not isinstance(linear, nn.Linear) or linear.weight.device.type != "cpu":
        return False
    out_features, in_features = linear.weight.shape
    return in_features % GROUP == 0 and out_features % 16 == 0


def quantize_model(model: nn.Module) -> int:
    """Swap the decoder layers' linears for Int4Linears and the LM head's for an Int8Linear (in
    a GGUF it is the 8-bit embedding, and the logits are what a user reads); how many were
    swapped. Linears int4 cannot hold (an input size not a multiple of 32) stay, and so does the
    head where PyTorch has no oneDNN int8 matmul."""
    count = 0
    for module_name, parent in list(model.named_modules()):
        head = "lm_head" in module_name.split(".")
        for name, child in list(parent.named_children()):
            if head and isinstance(child, nn.Linear) and child.weight.device.type == "cpu" and int8_supported():
                setattr(parent, name, Int8Linear(child))
                count += 1
            elif not head and quantizable(child):
                setattr(parent, name, Int4Linear(child))
                count += 1
    return count
