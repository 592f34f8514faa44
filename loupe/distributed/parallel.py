"""Tensor- and pipeline-parallel ranks, and the collectives between them.

A model replica runs on `tp_size * pp_size` scheduler processes ("ranks"); world rank =
`pp_rank * tp_size + tp_rank`. Every rank runs the same scheduler on the same requests and
so makes the same batching decisions, in lockstep; only the model differs: tensor-parallel
ranks hold a slice of every layer, pipeline stages hold a run of whole layers. The driver
(TP 0, PP 0) takes requests from the tokenizer manager and shares them with the others at
the start of every step (`share`); the last stage's sampled tokens go to every rank
(`share_tokens`), and their logprobs when a request asked (`share_from_last_stage`). With one rank every collective is a no-op.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    @classmethod
    def of_world_rank(cls, world_rank: int, tp_size: int, pp_size: int, dp_rank: int = 0,
                      dp_size: int = 1) -> Ranks:
        """The ranks of the process numbered `world_rank` in its replica."""
        return cls(world_rank % tp_size, tp_size, world_rank // tp_size, pp_size, dp_rank, dp_size)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def world_rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_driver(self) -> bool:
        return self.world_rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def labels(self) -> dict[str, int]:
        """The ranks a thread span names: TP always, PP and DP when there is more than one."""
        labels = {"TP": self.tp_rank}
        if self.pp_size > 1:
            labels["PP"] = self.pp_rank
        if self.dp_size > 1:
            labels["DP"] = self.dp_rank
        return labels

    def attributes(self) -> dict[str, int]:
        """All three ranks, for a thread span's attributes (whether or not its name shows them)."""
        return {"tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "dp_rank": self.dp_rank}

    def process_name(self) -> str:
        """`scheduler`, or with the ranks that exist: `scheduler [TP 1] [DP 0]`."""
        return "scheduler" + "".join(f" [{k} {v}]" for k, v in self.labels().items() if k != "TP" or self.tp_size > 1)


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The layers of one pipeline stage: an even split, the first stages taking the remainder."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


def free_address(host: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


class Comm:
    """The collectives one rank uses. `Comm(Ranks())` is the single-process case."""

    def __init__(self, ranks: Ranks, init_address: str | None = None, device: torch.device | None = None,
                 timeout_s: float = 1800):
        self.ranks = ranks
        self.device = device or torch.device("cpu")
        self.tp_group = self.cpu_group = None
        if ranks.world_size == 1:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=f"tcp://{init_address}", rank=ranks.world_rank,
                                world_size=ranks.world_size, timeout=timeout)
        # Every rank creates every group, in the same order (torch.distributed requires it).
        for stage in range(ranks.pp_size):
            group = dist.new_group([stage * ranks.tp_size + t for t in range(ranks.tp_size)])
            if stage == ranks.pp_rank:
                self.tp_group = group
        # Python objects (the requests) travel over gloo even when tensors use NCCL.
        self.cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel ranks of this stage, in place."""
        if self.ranks.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each tensor-parallel rank's `x` along the last dimension."""
        if self.ranks.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.ranks.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def send_to_next_stage(self, x: torch.Tensor) -> None:
        dist.send(x.contiguous(), self.ranks.world_rank + self.ranks.tp_size)

    def recv_from_previous_stage(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(x, self.ranks.world_rank - self.ranks.tp_size)
        return x

    @property
    def last_stage(self) -> int:
        """The world rank of the last stage's TP 0, which shares what that stage sampled."""
        return (self.ranks.pp_size - 1) * self.ranks.tp_size

    def _broadcast_object(self, value: object, source: int) -> object:
        box = [value]
        dist.broadcast_object_list(box, src=source, group=self.cpu_group)
        return box[0]

    def share(self, messages: list) -> list:
        """The driver's `messages`, on every rank."""
        return messages if self.ranks.world_size == 1 else self._broadcast_object(messages, 0)

    def share_tokens(self, tokens: list[int] | None, count: int) -> list[int]:
        """The last stage's `count` sampled tokens, on every rank (with one stage, each rank
        already sampled the same tokens from the same gathered logits)."""
        if self.ranks.pp_size == 1 or count == 0:
            return tokens or []
        t = torch.tensor(tokens, device=self.device) if tokens is not None else torch.empty(
            count, dtype=torch.long, device=self.device)
        dist.broadcast(t, src=self.last_stage)
        return t.tolist()

    def share_from_last_stage(self, value: object) -> object:
        """A Python object of the last stage (the sampled tokens' logprobs), on every rank (with
        one stage, each rank already has its own)."""
        return value if self.ranks.pp_size == 1 else self._broadcast_object(value, self.last_stage)

    def agree_min(self, value: int) -> int:
        """The smallest `value` of all ranks (e.g. KV cache size: every rank must use the same)."""
        if self.ranks.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
