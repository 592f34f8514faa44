"""Radix prefix cache and page pool on their own."""

from loupe.scheduler.cache import PagePool, RadixCache


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
