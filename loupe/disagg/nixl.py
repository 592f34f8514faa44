"""KV moved by NIXL (over UCX), page by page, from the prefill server's memory into the decode
server's: no copy through Python.

Each server registers its whole K and V cache with its NIXL agent once. A decode server's
claim names its agent (with the metadata to reach it), where its K and V live, and the pages
it reserved; the prefill server WRITEs each layer's pages of K and V straight into those
pages, with the room as the transfer's notification. The decode server counts a request's KV
as arrived when both the notification (the data is there) and the prefill server's
`KVHeader` (the first token, sent once the write completed) have come.

Both ends on one machine: set UCX_NET_DEVICES=lo, or UCX also uses the external interface.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import numpy as np

from loupe.runner.attention import KVCache

INSTALL = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"


@dataclass(frozen=True)
class NixlTarget:
    """What a decode server's claim tells the prefill server about where to write."""

    agent: str
    metadata: bytes
    k_address: int
    v_address: int
    num_slots: int
    pages: tuple[int, ...]


class NixlKV:
    """One server's NIXL agent. No progress thread (it spins a core): transfers progress when
    the scheduler polls, every millisecond while one is under way."""

    def __init__(self, kv: KVCache, page_size: int, role: str):
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = f"loupe-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self.agent.register_memory([(t.data_ptr(), t.nbytes, 0, "") for t in (kv.k, kv.v)], "DRAM")
        self.kv, self.page_size = kv, page_size
        self.page_bytes = page_size * kv.k[0, 0].nbytes
        self.peers: set[str] = set()
        self.writing: dict[int, tuple[object, int]] = {}  # room -> (transfer handle, start ns)

    def target(self, pages: list[int]) -> NixlTarget:
        k, v = self.kv.k, self.kv.v
        return NixlTarget(self.name, self.agent.get_agent_metadata(), k.data_ptr(), v.data_ptr(), k.shape[1],
                          tuple(pages))

    def write(self, room: int, pages: list[int], target: NixlTarget) -> None:
        """Start writing the K and V of `pages` (ours) into the target's pages, page for page."""
        if target.agent not in self.peers:
            self.agent.add_remote_agent(target.metadata)
            self.peers.add(target.agent)
        k, v = self.kv.k, self.kv.v
        local = self._descs((k.data_ptr(), v.data_ptr()), k.shape[1], pages)
        remote = self._descs((target.k_address, target.v_address), target.num_slots, target.pages[: len(pages)])
        handle = self.agent.initialize_xfer("WRITE", self.agent.get_xfer_descs(local, "DRAM"),
                                            self.agent.get_xfer_descs(remote, "DRAM"), target.agent, str(room).encode())
        self.writing[room] = (handle, time.perf_counter_ns())
        self.agent.transfer(handle)

    def finished_writes(self) -> list[tuple[int, bool, int]]:
        """(room, whether it succeeded, start ns) of the writes that ended since the last call."""
        ended = []
        for room, (handle, start) in list(self.writing.items()):
            state = self.agent.check_xfer_state(handle)
            if state in ("DONE", "ERR"):
                self.agent.release_xfer_handle(handle)
                del self.writing[room]
                ended.append((room, state == "DONE", start))
        return ended

    def arrived_rooms(self) -> list[int]:
        """Rooms whose data another server finished writing here since the last call."""
        return [int(message) for messages in self.agent.get_new_notifs().values() for message in messages]

    def _descs(self, bases: tuple[int, int], num_slots: int, pages) -> np.ndarray:
        """(address, length, device) of every layer's block of each page, in K then V."""
        layers = np.arange(self.kv.k.shape[0], dtype=np.uint64)[:, None]
        offsets = (layers * num_slots + np.asarray(pages, dtype=np.uint64)[None, :] * self.page_size)
        addresses = np.concatenate([base + offsets.ravel() * (self.page_bytes // self.page_size) for base in bases])
        return np.stack([addresses, np.full_like(addresses, self.page_bytes), np.zeros_like(addresses)], axis=1)
