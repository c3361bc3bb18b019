"""Block manager: hash chain, sharing, reference counts, eviction order, no write into a shared page."""

import pytest

from specdesk.engine import block_manager
from specdesk.engine.block_manager import BlockManager, page_hash, root_hash
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int], rid: str = "r", salt: str | None = None) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), cache_salt=salt)


def run_prefill(bm: BlockManager, s: Sequence) -> int:
    """Admit s, pretend the model computed all its tokens, publish its full pages."""
    hit = bm.allocate_prefix(s)
    assert bm.append_slots(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)
    return hit


def test_hash_chain_depends_on_whole_prefix() -> None:
    bm = BlockManager(16, BS)
    a, b = seq([1, 2, 3, 4, 5, 6, 7, 8]), seq([9, 9, 9, 9, 5, 6, 7, 8])
    bm._hash_full_blocks(a, 8)
    bm._hash_full_blocks(b, 8)
    # Same tokens in page 2, different page 1: the chain makes page 2's hashes differ.
    assert a.block_hashes[0] != b.block_hashes[0]
    assert a.block_hashes[1] != b.block_hashes[1]
    assert len(a.block_hashes) == 2
    # The chain is SHA-256 over the parent's key and the page's ids, starting from the tenant's root.
    assert a.block_hashes[0] == page_hash(root_hash(None), [1, 2, 3, 4])
    assert a.block_hashes[1] == page_hash(a.block_hashes[0], [5, 6, 7, 8])
    assert len({root_hash(None), root_hash(""), root_hash("acme")}) == 3  # no salt is not the empty salt


def test_a_key_collision_never_serves_other_tokens_or_another_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worst hash there is: every page of every prompt gets the same key.
    monkeypatch.setattr(block_manager, "page_hash", lambda parent, token_ids: b"same key")
    bm = BlockManager(16, BS)
    run_prefill(bm, seq(list(range(9)), "a", salt="acme"))
    assert bm.num_cached_blocks == 1  # page 2's key is taken by page 1: it stays private
    assert bm.allocate_prefix(seq([9, 9, 9, 9, 4, 5, 6, 7, 8], "other prompt", salt="acme")) == 0
    assert bm.allocate_prefix(seq(list(range(9)), "other tenant", salt="globex")) == 0
    assert bm.allocate_prefix(seq(list(range(9)), "no tenant")) == 0
    # The same prompt and tenant still hit its first page; page 2's key names page 1's tokens: a miss.
    assert bm.allocate_prefix(seq(list(range(9)), "same", salt="acme")) == BS


def test_prefix_shared_and_ref_counted() -> None:
    bm = BlockManager(16, BS)
    a = seq(list(range(10)), "a")
    assert run_prefill(bm, a) == 0
    b = seq([*list(range(8)), 42, 43, 44], "b")
    assert run_prefill(bm, b) == 8  # two full pages reused
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16
    assert bm.num_cached_blocks == 2  # the shared full pages; partly filled pages are never cached
    c = seq([*list(range(8)), 7], "c")
    assert run_prefill(bm, c) == 8  # cached after both owners finished


def test_last_token_always_computed() -> None:
    bm = BlockManager(16, BS)
    run_prefill(bm, seq(list(range(8)), "a"))
    b = seq(list(range(8)), "b")
    # All 8 tokens are cached, but the last page must be recomputed to produce logits.
    assert bm.allocate_prefix(b) == 4


def test_cache_salt_isolates_tenants() -> None:
    bm = BlockManager(16, BS)
    run_prefill(bm, seq(list(range(9)), "a", salt="acme"))
    assert bm.allocate_prefix(seq(list(range(9)), "b", salt="globex")) == 0
    assert bm.allocate_prefix(seq(list(range(9)), "c", salt="acme")) == 8


def test_eviction_is_lru_and_deepest_page_first() -> None:
    bm = BlockManager(6, BS)
    a = seq([*list(range(12)), 99], "a")  # 3 full pages + 1 partial
    run_prefill(bm, a)
    a_pages = list(a.block_table)
    bm.free(a)
    b = seq([100 + i for i in range(13)], "b")  # needs 4 pages; 3 unhashed free pages exist
    run_prefill(bm, b)
    # Free unhashed pages are used before any cached page, then a's deepest page is evicted first.
    assert bm.num_evicted_blocks == 1
    assert a_pages[2] in b.block_table
    assert bm.match_prefix(seq([*list(range(12)), 5], "x")) == a_pages[:2]


def test_recently_used_pages_survive_eviction() -> None:
    bm = BlockManager(4, BS)
    old, new = seq([1] * 4 + [0], "old"), seq([2] * 4 + [0], "new")
    run_prefill(bm, old)
    run_prefill(bm, new)
    bm.free(old)
    bm.free(new)
    again = seq([1] * 4 + [3], "again")
    run_prefill(bm, again)  # touches old's page: it becomes most recent
    bm.free(again)
    filler = seq([7] * 6, "filler")
    run_prefill(bm, filler)  # needs 2 pages: 2 unhashed free pages first
    filler2 = seq([8] * 3, "f2")
    run_prefill(bm, filler2)  # must evict one cached page: the least recently used is new's
    assert bm.match_prefix(seq([2] * 4 + [0], "n2")) == []
    assert len(bm.match_prefix(seq([1] * 4 + [0], "o2"))) == 1


def test_append_slots_refuses_without_changing_anything() -> None:
    bm = BlockManager(2, BS)
    s = seq(list(range(5)), "a")
    assert bm.allocate_prefix(s) == 0
    assert not bm.append_slots(s, 9)  # 3 pages needed, 2 exist
    assert s.block_table == [] and bm.num_free_blocks == 2
    assert bm.append_slots(s, 8)
    assert len(s.block_table) == 2


def test_writes_never_land_in_a_shared_page() -> None:
    # Why no copy-on-write is needed: a whole-prompt hit still leaves its last token to compute, and the
    # page that token is written to is never one of the shared pages.
    bm = BlockManager(8, BS)
    a = seq(list(range(8)), "a")  # exactly two full pages
    run_prefill(bm, a)
    b = seq(list(range(8)), "b")
    assert bm.allocate_prefix(b) == 4  # one page short of the whole prompt
    shared = set(b.block_table)
    assert bm.append_slots(b, b.num_tokens - b.num_computed_tokens + 1)
    first_written = b.block_table[b.num_computed_tokens // BS]
    assert first_written not in shared and bm.blocks[first_written].ref_count == 1


def test_trim_reclaims_draft_pages_and_free_returns_all() -> None:
    bm = BlockManager(8, BS)
    s = seq(list(range(3)), "a")
    bm.allocate_prefix(s)
    assert bm.append_slots(s, 3 + 6)  # 3 verified + 6 speculative slots: 3 pages
    assert len(s.block_table) == 3
    s.num_computed_tokens = 3
    s.token_ids += [7, 8]  # two drafts accepted
    bm.trim(s)
    assert len(s.block_table) == 2  # 5 verified tokens need 2 pages; the draft-only page is back
    bm.cache_full_blocks(s)
    assert bm.num_cached_blocks == 0  # only 3 tokens have KV: no page is full of verified tokens
    bm.free(s)
    assert bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    run_prefill(bm, seq(list(range(9)), "a"))
    assert bm.allocate_prefix(seq(list(range(9)), "b")) == 0
