"""The engine beneath the scheduler: one rank's model, its KV cache and the runner.

The worker loads the model, sizes the KV cache from free memory (every rank of a replica
agreeing on one size), allocates the KV tensors and the slot table, and runs forward passes
for the scheduler, which decides what runs and which pages each request holds
(scheduler/cache.py).
"""

from __future__ import annotations

import os
import time

import torch

from loupe.config import WorkerSettings
from loupe.core import KVLayout, ModelInfo, RequestLimits
from loupe.distributed.parallel import Comm, Ranks
from loupe.model.attention import KVCache
from loupe.model.loader import LoadedModel, load_model
from loupe.runner.compiled import CompiledDecode
from loupe.runner.model_runner import ModelRunner, Sampled, Sequence

CPU_KV_BUDGET_BYTES = 2 << 30


def resolve_device(device: str, index: int = 0) -> torch.device:
    """The device of a rank; `index` picks its GPU among this machine's."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if device == "cuda":
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device(device)


class Worker:
    def __init__(self, settings: WorkerSettings, comm: Comm | None = None, loaded: LoadedModel | None = None):
        self.comm = comm or Comm(Ranks())
        self.device = self.comm.device if comm else resolve_device(settings.device)
        t0 = time.perf_counter_ns()
        self.model = loaded or load_model(settings.model_path, settings.dtype, self.device.type,
                                          settings.context_length, self.comm, settings.quantization)
        loaded_at = time.perf_counter_ns()
        self.load_seconds = (loaded_at - t0) / 1e9
        config = self.model.config
        self.tokenizer = self.model.tokenizer
        self.context_length = settings.context_length or config.max_position_embeddings
        self.page_size = settings.page_size
        self.dtype = next(self.model.model.parameters()).dtype
        attention = self.model.model.layers[0].self_attn
        num_layers, num_kv_heads = len(self.model.model.layers), attention.num_kv_heads  # this rank's share
        per_token = KVCache.bytes_per_token(num_layers, num_kv_heads, config.head_dim, self.dtype)
        # Ranks measure their free memory apart, but must all hold the same number of pages.
        budget = settings.max_total_tokens or self._default_kv_tokens(per_token, settings.ranks_per_node)
        self.num_pages = self.comm.agree_min(budget) // self.page_size + 1  # page 0 is reserved
        self.kv = KVCache(num_layers, self.num_pages * self.page_size, num_kv_heads, config.head_dim, self.dtype,
                          self.device)
        sized_at = time.perf_counter_ns()
        weights = sum(p.numel() * p.element_size() for p in self.model.model.parameters())
        weights += sum(b.numel() * b.element_size() for b in self.model.model.buffers())
        # What its start took, for the start-up trace: (name, start, end perf_counter_ns, attributes)
        self.phases = [("load weights", t0, loaded_at, {"bytes": weights, "quantization": self.model.quantization
                                                         or "none", "dtype": str(self.dtype).removeprefix("torch.")}),
                       ("size the KV cache", loaded_at, sized_at, {
                           "tokens": self.num_pages * self.page_size, "bytes": per_token * self.num_pages * self.page_size,
                           "device": str(self.device)})]
        self.slot_table = torch.zeros(settings.max_running_requests, self.context_length, dtype=torch.int64,
                                      device=self.device)
        self.runner = ModelRunner(self.model, self.kv, self.slot_table, self.device)
        # The int4 decode step is compiled on a CPU with one rank (runner/compiled.py), unless --enforce-eager.
        single_rank = self.comm.ranks.tp_size * self.comm.ranks.pp_size == 1
        if settings.compile_decode and self.device.type == "cpu" and single_rank and self.model.quantization == "int4":
            started = time.perf_counter_ns()
            self.runner.compiled = CompiledDecode(self.model)
            self.phases.append(("compile and warm up the decode step", started, time.perf_counter_ns(), {}))
        self.limits = RequestLimits(config.vocab_size, self.context_length, (self.num_pages - 1) * self.page_size)

    def _default_kv_tokens(self, per_token: int, ranks_per_node: int) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.8)
        else:  # the machine's share, split between the ranks and replicas that run on it
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(available // 10, CPU_KV_BUDGET_BYTES) // ranks_per_node
        return max(budget // per_token, 4 * self.page_size)

    def forward(self, reqs: list[Sequence], num_new: list[int]) -> Sampled:
        """One forward pass of the runner (ModelRunner.forward)."""
        return self.runner.forward(reqs, num_new)

    @property
    def kv_layout(self) -> KVLayout:
        """What another server's KV must match to be copied into this cache."""
        return KVLayout(self.kv.k.shape[0], self.kv.k.shape[2], self.kv.k.shape[3],
                        str(self.dtype).removeprefix("torch."), self.page_size)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.model.path, str(self.device), str(self.dtype).removeprefix("torch."),
                         self.model.quantization, round(self.load_seconds, 2), self.limits)
