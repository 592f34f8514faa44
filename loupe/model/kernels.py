"""loupe's own CPU kernel: int4 weights times 8-bit activations with AVX-512 VNNI integer dot
products (`int4_vnni.cpp`), for every decode step of int4 layers.

PyTorch's int4 kernel turns every 4-bit weight into a float before multiplying, and oneDNN's
bfloat16 matmul (for wider steps) reads twice int4's bytes: both are bound by arithmetic on
these CPUs. As llama.cpp does, this kernel quantizes each row's activations to int8 per group of
32 (one scale each) and multiplies them with the codes by VPDPBUSD: one instruction multiplies
four inputs, broadcast, with 16 outputs' codes, so its 16 lanes are 16 outputs and never need
adding across. The weights keep GGUF Q4_1's bytes (0.625 a weight: codes, float16 scales and
minimums) in the order the kernel reads them. Measured (BENCHMARKS.md, int4 weights): one row
through the 30 layers of the bundled model 3.2 ms against PyTorch's 4.7, 32 rows 15 ms against
oneDNN bfloat16's 26.

It is compiled once on first use with the machine's C++ compiler (torch.utils.cpp_extension,
~10 s, cached under ~/.cache/torch_extensions/loupe_kernels-*) and used only where the CPU has
AVX-512 VNNI and F16C; elsewhere, if the build fails, or with `LOUPE_INT4_KERNEL=torch`,
PyTorch's kernels stay.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time

import torch

log = logging.getLogger(__name__)

NEEDED_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c"}


def cpu_flags() -> str:
    """The CPU's instruction-set flags as /proc/cpuinfo lists them; empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def int4_vnni_wanted() -> bool:
    """Whether the CPU can run the kernel and `LOUPE_INT4_KERNEL=torch` does not turn it off."""
    return os.environ.get("LOUPE_INT4_KERNEL") != "torch" and NEEDED_FLAGS <= set(cpu_flags().split())


@functools.cache
def int4_vnni_available() -> bool:
    """Whether `int4_vnni_linear` can run here: the CPU's flags, then the build (once a process)."""
    if not int4_vnni_wanted():
        return False
    start = time.perf_counter()
    try:
        _build()
    except Exception as error:  # no compiler, a compiler too old: PyTorch's kernels instead
        lines = str(error).splitlines()
        reason = next((line for line in lines if "error" in line.lower()), lines[0] if lines else repr(error))
        log.warning("int4 VNNI kernel not built (%s); PyTorch's int4 kernels instead", reason.strip()[:300])
        return False
    torch.library.register_fake("loupe_kernels::int4_vnni_linear")(_shape_of_int4_vnni_linear)
    log.info("int4 VNNI kernel ready in %.1f s", time.perf_counter() - start)
    return True


def build_folder() -> str:
    """Where the kernel is built and cached: under `TORCH_EXTENSIONS_DIR` as PyTorch's own
    extensions, one folder a PyTorch and Python, since a kernel built against another
    PyTorch's headers must not load."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    version = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(root, f"loupe_kernels-{version}")


def _build() -> None:
    """Compile int4_vnni.cpp (or find it compiled) and load it into this process.

    PyTorch's builder serializes processes with a lock file that a process killed mid-build
    leaves behind, and every later build waits on it forever; so builds here first take an
    flock (which dies with its process) and, holding it, remove any such file. Ninja comes
    from its wheel's folder, on PATH or not."""
    import fcntl

    import ninja
    from torch.utils import cpp_extension

    folder = build_folder()
    os.makedirs(folder, exist_ok=True)
    path = os.environ.get("PATH", "")
    with open(os.path.join(folder, "loupe.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "lock"))
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        try:
            # OpenMP for at::parallel_for, whose loop is inline: the process's libgomp (PyTorch's) runs it.
            cpp_extension.load("loupe_kernels", [os.path.join(os.path.dirname(__file__), "int4_vnni.cpp")],
                               build_directory=folder, is_python_module=False, verbose=False,
                               extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                             "-mavx512dq", "-mavx512vnni", "-mf16c"], extra_ldflags=["-fopenmp"])
        finally:
            os.environ["PATH"] = path


def _shape_of_int4_vnni_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0] * 16)


def pack_int4_blocks(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The kernel's weight, `[out / 16, in / 32, 320]` bytes, from codes `[out, in]` (0..15) and
    each group's scale and minimum `[out, in / 32]` (`w = scale * code + min`): for each block of
    16 outputs and group of 32 inputs, the codes in 256 bytes, then the 16 scales, then the 16
    minimums as float16. In the codes, 64-byte vector q (0..3) holds in lane i (4 bytes) output
    i's codes for inputs 4q .. 4q + 3 in its low halves and 16 + 4q .. 16 + 4q + 3 in its high."""
    out_features, in_features = codes.shape
    blocks, groups = out_features // 16, in_features // 32
    quads = codes.to(torch.uint8).reshape(blocks, 16, groups, 2, 4, 4)  # [block, lane, group, half, q, byte]
    halves = quads.permute(0, 2, 3, 4, 1, 5)  # [block, group, half, q, lane, byte]
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(blocks, groups, 256)

    def per_block(values: torch.Tensor) -> torch.Tensor:
        grouped = values.to(torch.float16).reshape(blocks, 16, groups).transpose(1, 2).contiguous()
        return grouped.view(torch.uint8)

    return torch.cat([packed, per_block(scales), per_block(mins)], dim=2).contiguous()


def int4_vnni_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[rows, in] float32 times a `pack_int4_blocks` weight -> [rows, out] float32."""
    return torch.ops.loupe_kernels.int4_vnni_linear(x, weight)
