"""KV moved by NIXL (over UCX), page by page, from the prefill server's memory into the decode
server's: no copy through Python.

Each server registers its whole K and V cache with its NIXL agent once. A decode server's
claim names its agent (with the metadata to reach it), where its K and V live, and the pages
it reserved; the prefill server WRITEs each layer's pages of K and V straight into those
pages, with the room as the transfer's notification. The decode server counts a request's KV
as arrived when both the notification (the data is there) and the prefill server's
`KVReady` message (the first token, sent once the write completed) have come.

Metadata reaches a peer only over the authenticated bootstrap channel. Every NIXL call that
touches a peer can fail when the peer has died (nixlRemoteDisconnectError, nixlBackendError):
those fail the one request, never the server.

Both ends on one machine: set UCX_NET_DEVICES=lo, or UCX also uses the external interface.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import suppress

import numpy as np

from loupe.disagg.wire import NixlTarget
from loupe.model.attention import KVCache

INSTALL = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"


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
        """Start writing the K and V of `pages` (ours) into the target's pages, page for page.
        Raises RuntimeError naming the cause if NIXL refuses (the peer is gone, say)."""
        try:
            if target.agent not in self.peers:
                name = self.agent.add_remote_agent(target.metadata)
                name = name.decode() if isinstance(name, bytes) else name
                if name != target.agent:
                    self.agent.remove_remote_agent(name)
                    raise RuntimeError(f"its NIXL metadata names agent {name[:64]!r}, its claim {target.agent!r}")
                self.peers.add(name)
            k, v = self.kv.k, self.kv.v
            local = self._descs((k.data_ptr(), v.data_ptr()), k.shape[1], pages)
            remote = self._descs((target.k_address, target.v_address), target.num_slots, target.pages[: len(pages)])
            handle = self.agent.initialize_xfer("WRITE", self.agent.get_xfer_descs(local, "DRAM"),
                                                self.agent.get_xfer_descs(remote, "DRAM"), target.agent,
                                                str(room).encode())
            self.writing[room] = (handle, time.perf_counter_ns())
            if self.agent.transfer(handle) == "ERR":
                raise RuntimeError("NIXL could not start the write")
        except Exception as e:  # NIXL's errors have no common base class but Exception
            self._end(room)
            raise RuntimeError(f"NIXL: {type(e).__name__}: {str(e)[:200]}") from None

    def finished_writes(self) -> list[tuple[int, bool, int]]:
        """(room, whether it succeeded, start ns) of the writes that ended since the last call."""
        ended = []
        for room, (handle, start) in list(self.writing.items()):
            try:
                state = self.agent.check_xfer_state(handle)
            except Exception:  # the peer is gone
                state = "ERR"
            if state in ("DONE", "ERR"):
                self._end(room)
                ended.append((room, state == "DONE", start))
        return ended

    def forget(self, agent: str) -> None:
        """A peer has gone: drop its metadata (a new one comes with its next claim)."""
        if agent in self.peers:
            self.peers.discard(agent)
            with suppress(Exception):
                self.agent.remove_remote_agent(agent)

    def arrived_rooms(self) -> set[int]:
        """Rooms whose data another server finished writing here since the last call. A
        notification that is not a room number is ignored."""
        return {int(message) for messages in self.agent.get_new_notifs().values() for message in messages
                if message.isdigit() and len(message) < 21}

    def _end(self, room: int) -> None:
        handle, _ = self.writing.pop(room, (None, 0))
        if handle is not None:
            with suppress(Exception):  # still active and not cancellable: NIXL keeps it
                self.agent.release_xfer_handle(handle)

    def _descs(self, bases: tuple[int, int], num_slots: int, pages) -> np.ndarray:
        """(address, length, device) of every layer's block of each page, in K then V."""
        layers = np.arange(self.kv.k.shape[0], dtype=np.uint64)[:, None]
        offsets = (layers * num_slots + np.asarray(pages, dtype=np.uint64)[None, :] * self.page_size)
        addresses = np.concatenate([base + offsets.ravel() * (self.page_bytes // self.page_size) for base in bases])
        return np.stack([addresses, np.full_like(addresses, self.page_bytes), np.zeros_like(addresses)], axis=1)
