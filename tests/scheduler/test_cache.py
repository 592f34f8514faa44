"""Radix prefix cache, page pool and the KV manager on their own."""

import torch

from loupe.core import SamplingParams, TokenizedRequest
from loupe.scheduler.cache import KVManager, PagePool, RadixCache
from loupe.scheduler.request import Req


def make(num_pages=32, page_size=2):
    pool = PagePool(num_pages, page_size)
    return pool, RadixCache(pool)


def test_match_returns_page_aligned_prefix():
    pool, tree = make()
    pages = pool.alloc(3)
    assert tree.insert([1, 2, 3, 4, 5, 6], pages) == 0
    found, node = tree.match_prefix([1, 2, 3, 4, 9, 9, 9])
    assert found == pages[:2]
    found, _ = tree.match_prefix([1, 2, 3])  # the partial page does not count
    assert found == pages[:1]
    assert tree.match_prefix([7, 7, 7])[0] == []


def test_insert_reports_pages_already_held_and_splits():
    pool, tree = make()
    first = pool.alloc(3)
    tree.insert([1, 2, 3, 4, 5, 6], first)
    second = pool.alloc(3)
    assert tree.insert([1, 2, 3, 4, 8, 8], second) == 2  # two pages were there already
    assert tree.match_prefix([1, 2, 3, 4, 8, 8, 0])[0] == first[:2] + second[2:]
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 0])[0] == first
    assert tree.total_pages() == 4


def test_locked_nodes_survive_eviction_and_lru_goes_first():
    pool, tree = make(num_pages=8)
    a, b = pool.alloc(2), pool.alloc(2)
    tree.insert([1, 1, 2, 2], a)
    tree.insert([3, 3, 4, 4], b)
    _, node_a = tree.match_prefix([1, 1, 2, 2, 0])
    tree.lock(node_a)
    assert tree.evictable_pages == 2
    free_before = len(pool.free_pages)
    assert tree.evict(10) == 2
    assert len(pool.free_pages) == free_before + 2
    assert tree.match_prefix([1, 1, 2, 2, 0])[0] == a
    assert tree.match_prefix([3, 3, 4, 4, 0])[0] == []
    tree.unlock(node_a)
    assert tree.evictable_pages == 2
    tree.evict(1)
    assert tree.total_pages() == 0 and len(pool.free_pages) == 7


def test_lru_order():
    pool, tree = make(num_pages=8)
    a, b = pool.alloc(1), pool.alloc(1)
    tree.insert([1, 1], a)
    tree.insert([2, 2], b)
    tree.match_prefix([1, 1, 0])  # touch a
    tree.evict(1)
    assert tree.match_prefix([1, 1, 0])[0] == a
    assert tree.match_prefix([2, 2, 0])[0] == []


def test_disabled_cache_matches_nothing():
    pool = PagePool(8, 2)
    tree = RadixCache(pool, enabled=False)
    assert tree.match_prefix([1, 2, 3])[0] == []


# ---- KVManager: the only code that hands pages to requests and takes them back -------------------

PS = 2  # tokens per page


def kv_manager(num_pages=16, rows=4, context=32):
    return KVManager(num_pages, PS, torch.zeros(rows, context, dtype=torch.int64))


def request(rid, prompt, output=()):
    req = Req(TokenizedRequest(rid, list(prompt), SamplingParams()), seed=0)
    req.output_ids = list(output)
    return req


def held(kv):
    """Pages not free: held by requests or by the tree."""
    return set(range(1, kv.pool.num_pages)) - set(kv.pool.free_pages)


def slots_of(kv, req, n):
    return kv.slots.table[req.row, :n].tolist()


def test_admit_takes_a_row_and_the_cached_prefix_locked():
    kv = kv_manager(rows=1)
    first = request("a", [1, 2, 3, 4, 5])
    assert kv.admit(first) and first.kv_len == 0 and first.kv.pages == []
    assert kv.grow(first, 5)
    first.kv_len = 5
    kv.release(first, cache=True)  # two full pages go to the tree, the partial one is freed
    again = request("b", [1, 2, 3, 4, 9, 9])
    assert kv.admit(again)
    assert again.kv_len == 4 and again.kv.num_tree_pages == 2 and kv.tree.evictable_pages == 0
    assert slots_of(kv, again, 4) == [p * PS + o for p in again.kv.pages for o in range(PS)]
    assert not kv.admit(request("c", [7, 7]))  # no row left
    kv.release(again, cache=False)
    assert kv.tree.evictable_pages == 2 and again.kv is None


def test_grow_evicts_unlocked_prefixes_and_changes_nothing_when_short():
    kv = kv_manager(num_pages=5)  # pages 1-4
    cached = request("a", [1, 2, 3, 4])
    kv.admit(cached)
    kv.grow(cached, 4)
    cached.kv_len = 4
    kv.release(cached, cache=True)
    req = request("b", [9, 9, 9, 9, 9, 9])
    assert kv.admit(req) and req.kv_len == 0
    assert kv.grow(req, 6)  # needs 3 pages: the tree gives its two back (one node)
    assert len(req.kv.pages) == 3 and kv.tree.total_pages() == 0
    assert slots_of(kv, req, 6) == [p * PS + o for p in req.kv.pages for o in range(PS)]
    assert not kv.grow(req, 6 + 2 * PS)  # two more pages: only one can be had
    assert not kv.grow(req, 7, reserve=1)  # one more, and one to spare: the same
    assert len(req.kv.pages) == 3 and len(kv.pool.free_pages) == 1


def test_release_without_caching_frees_everything_private():
    kv = kv_manager()
    req = request("a", [1, 2, 3, 4, 5])
    kv.admit(req)
    kv.grow(req, 5)
    req.kv_len = 5
    kv.release(req, cache=False)
    assert held(kv) == set() and kv.tree.total_pages() == 0 and kv.slots.free_rows


def test_retract_keeps_the_computed_kv_for_the_next_admission():
    kv = kv_manager()
    req = request("a", [1, 2, 3, 4, 5], output=[6, 7])
    kv.admit(req)
    kv.grow(req, 7)
    req.kv_len = 6  # the last output token is the next input
    kv.release(req, cache=True)  # as the scheduler retracts it
    assert req.kv is None and req.kv_len == 0
    assert held(kv) == set(kv.tree.root.children[(1, 2)].pages) and kv.tree.total_pages() == 3
    assert kv.admit(req) and req.kv_len == 6 and req.kv.num_tree_pages == 3


def test_release_caches_the_full_pages_and_frees_the_partial_one():
    kv = kv_manager()
    req = request("a", [1, 2, 3, 4, 5], output=[42])
    kv.admit(req)
    kv.grow(req, 6)
    req.kv_len = 5  # 5 tokens: 3 pages of 2, the last one partial
    kv.release(req, cache=True)
    assert kv.tree.total_pages() == 2 and len(held(kv)) == 2


def test_admit_external_reserves_fresh_pages_to_be_filled():
    kv = kv_manager(num_pages=5)
    kv.admit(prefix := request("p", [1, 2, 3, 4]))
    kv.grow(prefix, 4)
    prefix.kv_len = 4
    kv.release(prefix, cache=True)  # cached, but KV from outside does not reuse it
    req = request("a", [1, 2, 3, 4, 5])
    pages = kv.admit_external(req, 5)
    assert pages == req.kv.pages and len(pages) == 3 and req.kv_len == 5 and req.kv.num_tree_pages == 0
    assert slots_of(kv, req, 5) == [p * PS + o for p in pages for o in range(PS)][:5]
    assert kv.tree.total_pages() == 0  # evicted for room
    assert kv.admit_external(request("b", [1] * 7), 7) is None  # 4 pages: one is left
    assert held(kv) == set(pages) and len(kv.slots.free_rows) == 3  # the failed one holds nothing
