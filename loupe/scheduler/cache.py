"""KV memory bookkeeping: pages, per-request slot tables, and the radix prefix cache.

The KV tensors and the slot table tensor belong to the worker (runner/worker.py); this
module decides which slots each request uses, and `KVManager` is the only code that hands
pages to requests or takes them back. Memory is handed out in pages of `page_size` token slots; page
`p` owns slots `[p * page_size, (p + 1) * page_size)`. Page 0 is reserved (its slot 0 is
the zero padding of slot tables).

Ownership — every page other than page 0 is in exactly one of three places:

    free list          PagePool.free_pages; nobody's
    radix tree         a node's `pages`; shared, read-only, evictable when unlocked
    a request's tail   req.kv.pages[req.kv.num_tree_pages:]; private to that request

A request's `kv` (a `KVHold`, None while it holds nothing) is all it holds:

    kv.pages:   [ tree pages (matched, locked) | private pages (written by this request) ]
                 ^ 0                           ^ num_tree_pages                          ^ len

A request locks the deepest tree node it matched (`kv.prefix_node`), which pins that node
and all its ancestors against eviction. When it ends (finish or retraction) its computed
full pages are inserted into the tree: pages the tree already holds for the same tokens
are duplicates and go back to the free list, the rest become the tree's, and the partial
last page is freed. An aborted request frees its private pages without caching them.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.num_pages = num_pages
        self.free_pages = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self.free_pages):
            return None
        return [self.free_pages.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self.free_pages.extend(pages)


class SlotTable:
    """`table[row, pos]` is the KV slot of token `pos` of the request holding `row`."""

    def __init__(self, table: torch.Tensor, page_size: int):
        self.table = table
        self.free_rows = list(range(table.shape[0] - 1, -1, -1))
        self.page_offsets = torch.arange(page_size, device=table.device)
        self.page_size = page_size

    def alloc_row(self) -> int | None:
        return self.free_rows.pop() if self.free_rows else None

    def free_row(self, row: int) -> None:
        self.free_rows.append(row)

    def write_pages(self, row: int, first_page_index: int, pages: list[int]) -> None:
        if not pages:
            return
        ps = self.page_size
        slots = (torch.tensor(pages, device=self.table.device)[:, None] * ps + self.page_offsets).flatten()
        start = first_page_index * ps
        end = min(start + len(slots), self.table.shape[1])
        self.table[row, start:end] = slots[: end - start]


@dataclass(slots=True, eq=False, repr=False)  # nodes are compared by identity
class Node:
    key: tuple[int, ...]
    pages: list[int]
    parent: Node | None
    lock_ref: int = 0
    last_access: int = 0
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)


class RadixCache:
    """Token-prefix tree at page granularity: node keys are whole pages of token ids."""

    def __init__(self, pool: PagePool, enabled: bool = True):
        self.pool = pool
        self.page_size = pool.page_size
        self.enabled = enabled
        self.root = Node((), [], None, lock_ref=1)  # never evicted
        self.evictable_pages = 0
        self._clock = itertools.count(1)

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], Node]:
        """Pages holding the longest cached page-aligned prefix of `tokens`, and its node."""
        if not self.enabled:
            return [], self.root
        node, _, pages = self._descend(tokens)
        return pages, node

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        """Cache `pages` (one per full page of `tokens`). Returns how many leading pages the
        tree already held; the caller frees its own pages for that span if they differ."""
        node, pos, _ = self._descend(tokens)
        if pos < len(tokens):
            new = Node(tuple(tokens[pos:]), pages[pos // self.page_size :], node, last_access=node.last_access)
            node.children[new.key[: self.page_size]] = new
            self.evictable_pages += len(new.pages)
        return pos // self.page_size

    def lock(self, node: Node) -> None:
        while node is not None:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_pages += len(node.pages)
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` pages from unlocked leaves, least recently used first."""
        freed = 0
        leaves = [(n.last_access, id(n), n) for n in self._nodes() if not n.children]
        heapq.heapify(leaves)
        while freed < num_pages and leaves:
            _, _, victim = heapq.heappop(leaves)
            if victim.lock_ref > 0:
                continue
            parent = victim.parent
            del parent.children[victim.key[: self.page_size]]
            self.pool.free(victim.pages)
            self.evictable_pages -= len(victim.pages)
            freed += len(victim.pages)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        return freed

    def total_pages(self) -> int:
        return sum(len(n.pages) for n in self._nodes())

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _common_pages(self, key: tuple[int, ...], tokens: list[int], pos: int) -> int:
        ps, n = self.page_size, 0
        while n * ps < len(key) and pos + (n + 1) * ps <= len(tokens):
            if key[n * ps : (n + 1) * ps] != tuple(tokens[pos + n * ps : pos + (n + 1) * ps]):
                break
            n += 1
        return n

    def _descend(self, tokens: list[int]) -> tuple[Node, int, list[int]]:
        """The deepest node whose path is whole pages of `tokens` (a node matched only in part is
        split), how many tokens that path covers, and its pages; each node on it is used now."""
        node, pos, pages, ps = self.root, 0, [], self.page_size
        node.last_access = tick = next(self._clock)
        while len(tokens) - pos >= ps:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                break
            n = self._common_pages(child.key, tokens, pos)
            if n < len(child.pages):
                child = self._split(child, n)
            pages.extend(child.pages)
            pos += len(child.key)
            node = child
            node.last_access = tick
        return node, pos, pages

    def _split(self, node: Node, num_pages: int) -> Node:
        """Cut `node` after `num_pages` pages; return the new upper part."""
        cut = num_pages * self.page_size
        upper = Node(node.key[:cut], node.pages[:num_pages], node.parent, node.lock_ref, node.last_access)
        upper.children[node.key[cut : cut + self.page_size]] = node
        node.parent.children[node.key[: self.page_size]] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[num_pages:], upper
        return upper


@dataclass
class KVHold:
    """The slot-table row and pages one request holds, and the tree node it locked."""

    row: int
    prefix_node: Node
    pages: list[int]
    num_tree_pages: int  # the first pages are the tree's (matched); the rest the request's own


class KVManager:
    """Which pages and slot-table row each request holds. Only these methods give a request its
    `kv` (a KVHold) or take it back, and set its `kv_len` on admission and release; the
    scheduler advances `kv_len` as forward passes compute more."""

    def __init__(self, num_pages: int, page_size: int, slot_table: torch.Tensor, radix: bool = True):
        self.page_size = page_size
        self.pool = PagePool(num_pages, page_size)
        self.tree = RadixCache(self.pool, enabled=radix)
        self.slots = SlotTable(slot_table, page_size)

    def admit(self, req) -> bool:
        """A row, and the pages of the longest cached prefix of `req` (locked); False if no row."""
        row = self.slots.alloc_row()
        if row is None:
            return False
        pages, node = self.tree.match_prefix(req.all_ids[: req.seq_len - 1])
        self._hold(req, row, node, pages)
        req.kv_len = len(pages) * self.page_size
        return True

    def admit_external(self, req, num_tokens: int) -> list[int] | None:
        """A row and fresh pages for the first `num_tokens` of `req`, whose KV another server
        computed and writes into them; `kv_len` counts them at once, so the request must not
        run until they are filled. None, holding nothing, if memory is short."""
        row = self.slots.alloc_row()
        if row is None:
            return None
        self._hold(req, row, self.tree.root, [])
        if not self.grow(req, num_tokens):
            self.release(req, cache=False)
            return None
        req.kv_len = num_tokens
        return list(req.kv.pages)

    def grow(self, req, new_len: int, reserve: int = 0) -> bool:
        """Pages for the first `new_len` tokens of `req`, evicting cached prefixes if needed,
        and leaving `reserve` pages free; False (nothing changed) if memory is short."""
        hold = req.kv
        needed = -(-new_len // self.page_size) - len(hold.pages)
        if needed <= 0:
            return True
        shortfall = needed + reserve - len(self.pool.free_pages)
        if shortfall > 0:
            self.tree.evict(shortfall)
        if len(self.pool.free_pages) < needed + reserve:
            return False
        pages = self.pool.alloc(needed)
        self.slots.write_pages(hold.row, len(hold.pages), pages)
        hold.pages.extend(pages)
        return True

    def release(self, req, cache: bool) -> None:
        """Give back a request's row and pages; with `cache`, its computed full pages go to the
        prefix tree (pages the tree holds already for the same tokens are freed)."""
        computed = req.kv_len
        hold = self.detach(req)
        if hold is None:
            return
        if cache and self.tree.enabled:
            num_full = computed // self.page_size
            already = self.tree.insert(req.all_ids[: num_full * self.page_size], hold.pages[:num_full])
            self.free(hold, hold.pages[hold.num_tree_pages : already] + hold.pages[num_full:])
        else:
            self.free(hold)

    def detach(self, req) -> KVHold | None:
        """Take `req`'s row and pages from it, to be `free`d later (another server may still be
        writing into them); `req` then holds nothing."""
        hold, req.kv, req.kv_len = req.kv, None, 0
        return hold

    def free(self, hold: KVHold, pages: list[int] | None = None) -> None:
        """Give back a hold no request has any more: its row, its lock on the tree, and its own
        pages (or `pages` of them, where the tree took the others)."""
        self.pool.free(hold.pages[hold.num_tree_pages :] if pages is None else pages)
        self.tree.unlock(hold.prefix_node)
        self.slots.free_row(hold.row)

    @property
    def used_tokens(self) -> int:
        """Tokens of KV held by running requests and by locked prefixes (not evictable)."""
        used_pages = self.pool.num_pages - 1 - len(self.pool.free_pages) - self.tree.evictable_pages
        return used_pages * self.page_size

    @property
    def cached_tokens(self) -> int:
        """Tokens of KV the prefix tree keeps for reuse and could evict (no request holds them)."""
        return self.tree.evictable_pages * self.page_size

    def _hold(self, req, row: int, node: Node, pages: list[int]) -> None:
        self.tree.lock(node)
        req.kv = KVHold(row, node, list(pages), len(pages))
        self.slots.write_pages(row, 0, pages)
