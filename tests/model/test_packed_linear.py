"""PackedLinear's memory: oneDNN keeps what it builds for each input shape, and a server
sees a new row count with nearly every prefill step. The first PackedLinear bounds those caches,
whichever path builds it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a fresh process that builds hundreds of shapes: ~15 s

GROWTH = """
import ctypes, os, sys, torch
from torch import nn
if sys.argv[1].isdigit():
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = os.environ["LRU_CACHE_CAPACITY"] = sys.argv[1]
from loupe.model.layers import pack_linears
from loupe.model.quant import Int4Linear
if sys.argv[1] == "int4 first":  # the loader's order: quantize_model packs its float copies first
    Int4Linear(nn.Linear(64, 64, bias=False))

def rss_mb():  # what is in use: the freed memory glibc keeps is given back first
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

model = nn.Sequential(nn.Linear(576, 1536, bias=False))
assert pack_linears(model) == 1
x = torch.randn(500, 576)
with torch.no_grad():
    model(x[:1])
    before = rss_mb()
    for rows in range(100, 500):  # 400 shapes, as 400 prefill steps of different lengths
        model(x[:rows])
print(rss_mb() - before)
"""


def growth_mb(capacity: str) -> float:
    run = subprocess.run([sys.executable, "-c", GROWTH, capacity], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert run.returncode == 0, run.stderr
    return float(run.stdout.split()[-1])


def test_the_matmul_caches_stay_bounded_across_many_shapes():
    unbounded = growth_mb("1024")  # oneDNN's own default
    for order in ("default", "int4 first"):
        bounded = growth_mb(order)
        assert bounded < unbounded / 2, (order, bounded, unbounded)
