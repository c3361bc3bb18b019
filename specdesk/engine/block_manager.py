"""Paged KV cache bookkeeping: pages (blocks), reference counts, prefix caching. Plain Python: no torch.

A page holds `block_size` consecutive positions of one sequence. Every *full* page whose tokens are all
verified gets a chained key: SHA-256 over the parent page's key and this page's token ids, the chain
starting from a root that carries the request's cache salt. Two requests whose token ids (and salt) start
the same way therefore map to the same chain, and the second reuses the first one's pages instead of
prefilling them: a conversation's earlier turns, its generated answers, a shared system prompt.

Why a cryptographic hash: a page's key stands for its whole prefix and its tenant, so two different
prefixes with equal keys would serve one prompt another prompt's KV (and, with salts, another tenant's).
A 64-bit `hash()` makes that a matter of luck; SHA-256 makes it infeasible, even for inputs chosen to
collide. On top of that a published page keeps its own token ids and salt, and a hit compares them, so
no key collision, whatever the hash, can hand out a page holding other tokens or another tenant's KV.

Invariants (asserted below):
  * a page is in exactly one of: referenced by >= 1 sequence, the free list, the evictable LRU;
  * only full pages of verified tokens are hashed (speculative drafts live past num_computed_tokens in
    private pages and are never hashed);
  * a page is written only while its ref count is 1: only full pages are shared, and a prefix hit stops
    short of the last prompt token, so every write lands past the shared pages.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as IntSequence
from dataclasses import dataclass

from specdesk.engine.sequence import Sequence

_ROOT = b"specdesk prefix cache v1\0"


def root_hash(cache_salt: str | None) -> bytes:
    """The chain's start for one tenant: no salt and the empty salt are different tenants."""
    salt = b"\0" if cache_salt is None else b"\1" + cache_salt.encode("utf-8", "surrogatepass")
    return hashlib.sha256(_ROOT + salt).digest()


def page_hash(parent: bytes, token_ids: IntSequence[int]) -> bytes:
    """A full page's key: SHA-256 of the parent's 32-byte key and the page's ids as fixed-width int64."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set while the page is published in the prefix cache: its key, and what a hit must match exactly.
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None
    cache_salt: str | None = None

    def unpublish(self) -> None:
        self.block_hash = None
        self.token_ids = None
        self.cache_salt = None


class BlockManager:
    """Allocates pages to sequences and keeps unreferenced full pages cached until memory is needed."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks >= 1 and block_size >= 1, (num_blocks, block_size)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # unhashed and unreferenced: used first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # hashed, unreferenced; least recent first
        self.hash_to_block: dict[bytes, int] = {}
        self.num_evicted_blocks = 0
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of pages referenced by live sequences (cached-but-free pages count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- hashing ------------------------------------------------------------------------------
    def _hash_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq.block_hashes to cover every full page within token_ids[:num_tokens]."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = seq.block_hashes[i - 1] if i else root_hash(seq.cache_salt)
            seq.block_hashes.append(page_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def _page_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages (ids, in order) that hold a prefix of seq's tokens. No side effects on pages.

        At most (num_tokens - 1) tokens can hit: the last token is always computed to get logits.
        """
        if not self.enable_prefix_caching:
            return []
        max_hit_blocks = (seq.num_tokens - 1) // self.block_size
        self._hash_full_blocks(seq, max_hit_blocks * self.block_size)
        hits: list[int] = []
        for i, h in enumerate(seq.block_hashes[:max_hit_blocks]):
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            # Equal keys must mean equal content: check the page's own tokens and tenant exactly.
            if block.token_ids != self._page_tokens(seq, i) or block.cache_salt != seq.cache_salt:
                break
            hits.append(block_id)
        return hits

    # ---- allocation ---------------------------------------------------------------------------
    def allocate_prefix(self, seq: Sequence) -> int:
        """Admit a sequence: take its cached prefix pages. Returns the number of reused tokens."""
        assert not seq.block_table and seq.num_computed_tokens == 0, (seq.request_id, seq.block_table)
        hits = self.match_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.evictable[block_id]
            block.ref_count += 1
        seq.block_table = hits
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def record_admission(self, seq: Sequence) -> None:
        """Count a successful admission in the prefix-cache hit statistics (not failed attempts)."""
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def _num_blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        end = seq.num_computed_tokens + num_new_tokens
        return max(self.blocks_needed(end) - len(seq.block_table), 0)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for KV of token positions [num_computed_tokens, num_computed_tokens + num_new_tokens).

        Returns False (and changes nothing) if the pool is short of pages. Writes never land in a shared
        page: only full pages are shared, and a prefix hit stops one token short of the prompt's end, so the
        first position written is always past every shared page (no copy-on-write is needed).
        """
        if not self.can_append(seq, num_new_tokens):
            return False
        end = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) < self.blocks_needed(end):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        else:
            # Evict the least recently used cached page; its hash no longer names valid content.
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            assert block.block_hash is not None, block_id
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.unpublish()
            self.num_evicted_blocks += 1
        block = self.blocks[block_id]
        assert block.ref_count == 0, (block_id, block.ref_count)
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash and publish every page now full of verified (computed) tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._hash_full_blocks(seq, num_full * self.block_size)
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                continue
            h = seq.block_hashes[i]
            # If an identical page is already published (two requests prefilled the same text at once),
            # keep the first; this copy stays private and is freed normally.
            if h not in self.hash_to_block:
                block.block_hash = h
                block.token_ids = self._page_tokens(seq, i)
                block.cache_salt = seq.cache_salt
                self.hash_to_block[h] = block.block_id

    def trim(self, seq: Sequence) -> None:
        """Free pages past the last verified token (slots of rejected speculative drafts)."""
        keep = self.blocks_needed(seq.num_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        """Drop a sequence's references. Tail pages go to the LRU first, so the deepest are evicted first."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, (block_id, block.ref_count)
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None:
                self.evictable[block_id] = None
            else:
                self.free_ids.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached page (benchmarks measure cold starts with this)."""
        while self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None and self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.unpublish()
            self.free_ids.append(block_id)
