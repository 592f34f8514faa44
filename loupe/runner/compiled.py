"""The int4 decode step compiled with torch.compile, for one stream's speed on a CPU.

Eagerly, a decode step of the bundled model is ~1,000 small PyTorch ops, and their dispatch
and Python cost more than the int4 matmuls that read the weights. Compiled as one graph
(inductor), each layer's norms, rotary, residual adds and SwiGLU fuse into a few C++ loops and
the step is one call. It serves forward passes that only decode, of any row count, on a model
that runs on one rank on a CPU: prefills run eagerly, and so does everything under
`--quantization none`, which stays exact. It compiles once, at start, from a scratch KV cache:
three graphs, for one row, for 2 to INT4_MAX_ROWS and for more (without loupe's VNNI kernel the
two sides of quant.Int4Linear: PyTorch's int4 kernel, then the bfloat16 or float copy) (BENCHMARKS.md:
warm-up and speed).
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import torch

from loupe.model.attention import ForwardBatch, KVCache
from loupe.model.loader import LoadedModel
from loupe.model.quant import INT4_MAX_ROWS
from loupe.runner.model_runner import ModelRunner

log = logging.getLogger(__name__)


def mark_dynamic(batch: ForwardBatch, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """The sizes that change from step to step (the rows where there are two or more, the keys)
    or from cache to cache (its slots); all others, the weights' above all, stay constants."""
    rows = [0] if len(input_ids) > 1 else []  # one row: a graph of its own
    if rows:
        for tensor in (input_ids, positions, batch.out_slots):
            torch._dynamo.mark_dynamic(tensor, 0)
    torch._dynamo.mark_dynamic(batch.decode.slots, [*rows, 1])
    if batch.decode.mask is not None:
        torch._dynamo.mark_dynamic(batch.decode.mask, [*rows, 3])
    for layer in (*batch.kv.k_layers, *batch.kv.v_layers):
        torch._dynamo.mark_dynamic(layer, 0)


class CompiledDecode:
    """`model.forward` for decode-only batches, compiled."""

    def __init__(self, loaded: LoadedModel):
        # Guards on the model's modules and weights are skipped: neither changes after loading,
        # and checking them costs ~1 ms a step.
        self.forward = torch.compile(loaded.model.forward,
                                     options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.warm_up_seconds = self._warm_up(loaded)

    @staticmethod
    def serves(batch: ForwardBatch, num_tokens: int) -> bool:
        return batch.num_decode == num_tokens  # decodes only

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # Inputs the graphs compiled at start do not cover run eagerly rather than stall a step to compile.
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.forward(input_ids, positions, batch)

    def _warm_up(self, loaded: LoadedModel) -> float:
        """Compile the graphs for one row, for a few and for more than INT4_MAX_ROWS (both with
        one mask over their keys), on a scratch cache: the real one is not written."""
        start = time.perf_counter()
        layer = loaded.model.layers[0].self_attn
        dtype = next(loaded.model.parameters()).dtype
        # Sizes that no other dimension has (the compiler takes equal sizes for one symbol):
        # rows of 37 slots, and INT4_MAX_ROWS + 3 rows of 3 to INT4_MAX_ROWS + 5 keys for the widest.
        wide = INT4_MAX_ROWS + 3
        kv = KVCache(len(loaded.model.layers), wide * 37, layer.num_kv_heads, layer.head_dim, dtype, "cpu")
        scratch = ModelRunner(loaded, kv, torch.arange(wide * 37).view(wide, 37), torch.device("cpu"))
        for lengths in ((5,), (7, 4), tuple(range(3, 3 + wide))):
            reqs = [SimpleNamespace(row=row, kv_len=n - 1, seq_len=n, all_ids=[1] * n, output_ids=[1])
                    for row, n in enumerate(lengths)]
            # Floats (the norms' epsilon) as constants: taken as inputs, they make the compiler
            # start each graph over, a third of its time.
            with torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True):
                batch, input_ids, positions = scratch._prepare(reqs, [1] * len(reqs))
                mark_dynamic(batch, input_ids, positions)
                self.forward(input_ids, positions, batch)
        seconds = time.perf_counter() - start
        log.info("compiled the int4 decode step in %.1f s (--enforce-eager: not at all)", seconds)
        return seconds
