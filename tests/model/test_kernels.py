"""loupe's int4 x int8 VNNI kernel (model/kernels.py, int4_vnni.cpp) against the float matmul of
its grid, its weight layout, and where it is not used."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from loupe.model import kernels, quant
from loupe.model.kernels import int4_vnni_available, int4_vnni_linear, pack_int4_blocks
from loupe.model.quant import Int4Linear, quantize_int4

vnni_cpu = pytest.mark.skipif(not kernels.NEEDED_FLAGS <= set(kernels.cpu_flags().split()),
                              reason="the kernel needs AVX-512 VNNI (every machine of this project's kind has it)")


def test_each_block_of_16_outputs_holds_a_groups_codes_then_its_scales_then_its_minimums():
    codes = torch.randint(0, 16, (32, 64))
    scales, mins = torch.rand(32, 2), -torch.rand(32, 2)
    packed = pack_int4_blocks(codes, scales, mins)
    assert packed.shape == (2, 2, 320) and packed.dtype == torch.uint8
    for block, group, q, lane in [(0, 0, 0, 0), (1, 1, 3, 15), (0, 1, 2, 7)]:
        output, first = 16 * block + lane, 32 * group + 4 * q
        four = packed[block, group, 64 * q + 4 * lane:64 * q + 4 * lane + 4].long()
        assert torch.equal(four & 15, codes[output, first:first + 4])
        assert torch.equal(four >> 4, codes[output, first + 16:first + 20])
    assert torch.equal(packed[1, 0, 256:288].contiguous().view(torch.float16), scales[16:, 0].half())
    assert torch.equal(packed[1, 1, 288:].contiguous().view(torch.float16), mins[16:, 1].half())


@vnni_cpu
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("in_features", [32, 576, 1536])
def test_the_kernel_computes_what_its_grid_does_to_8_bit_activations(rows, in_features):
    assert int4_vnni_available()
    torch.manual_seed(rows)
    codes, scales_and_zeros = quantize_int4(torch.randn(80, in_features) * 0.05)
    scale, zero = scales_and_zeros.unbind(-1)
    x = torch.randn(rows, in_features)
    x[0, :32] = 0  # a group of zeros: its scale is 0, not a division by it
    scale, low = scale.half().float(), (zero - 8 * scale).half().float()  # the kernel keeps them as float16
    weight = (codes.view(80, -1, 32) * scale.t()[:, :, None] + low.t()[:, :, None]).view(80, in_features)
    expected = x @ weight.t()
    got = int4_vnni_linear(x, pack_int4_blocks(codes, scale.t(), low.t()))
    assert got.shape == expected.shape and got.dtype == torch.float32
    # each activation is off by at most half a step of its group's 127: the error that bounds
    error_bound = (x.abs().view(rows, -1, 32).amax(-1, keepdim=True) / 254).expand(-1, -1, 32).reshape(rows, -1)
    assert ((got - expected).abs() <= error_bound @ weight.abs().t() + 1e-4).all()


@vnni_cpu
@pytest.mark.parametrize("rows", [2, 40])
def test_int4_linears_use_it_for_every_decode_step_and_compile_around_it(rows, monkeypatch):
    linear = nn.Linear(128, 96, bias=False)
    layer = Int4Linear(linear)
    assert layer.vnni is not None and layer.packed is None and layer.wide_decode is None  # no bfloat16 copy
    x = torch.randn(rows, 128)
    calls = []
    monkeypatch.setattr(quant, "int4_vnni_linear", lambda *args: calls.append(args) or int4_vnni_linear(*args))
    with torch.inference_mode():
        eager = layer(x)
        grid = quant.dequantize_int4(*quantize_int4(linear.weight))  # a prefill: the grid in float32, not the kernel
        torch.testing.assert_close(layer(x, exact=True), x @ grid.t(), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    monkeypatch.undo()
    with torch.inference_mode():
        compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)


@vnni_cpu
def test_a_lock_left_by_a_build_killed_halfway_does_not_stop_the_next():
    assert int4_vnni_available()  # built (or found built) by this process
    stale = os.path.join(kernels.build_folder(), "lock")
    open(stale, "w").close()
    check = "from loupe.model import kernels; assert kernels.int4_vnni_available()"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
    assert not os.path.exists(stale)


def test_without_vnni_int4_linears_keep_pytorchs_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: "avx2 avx512f")
    int4_vnni_available.cache_clear()
    try:
        layer = Int4Linear(nn.Linear(128, 96, bias=False))
        assert layer.vnni is None and layer.packed is not None
    finally:
        int4_vnni_available.cache_clear()
