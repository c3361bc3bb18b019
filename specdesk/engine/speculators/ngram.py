"""Training-free speculation: continue the longest recent suffix that was seen before (prompt lookup).

Support answers repeat themselves, within a conversation (order numbers, the customer's own words) and
across conversations (greetings, policies, sign-offs). For the last n tokens of a sequence (n from max_n
down to min_n) we look up where that n-gram occurred before and propose the k tokens that followed it,
first in the sequence itself, then in a bounded store of earlier assistant replies of the same tenant (the
requests' cache salt: a tenant's drafts, and so its speed, never tell what another tenant's replies said,
as the prefix cache's pages do not). Where neither has
k tokens, a frozen store of the model's own replies (`reply_store.py`, shipped with the default speculator)
walks its most frequent continuations instead, when that gives more. A sequence caught in a loop shorter than
k (its suffix matches one period back, over the whole period) gets the loop repeated up to k tokens: its last
occurrence is followed by fewer than k tokens, but the loop's next turn is the likeliest continuation there is.
Where the sequence's own match reaches LONG_MATCH tokens back, the draft may be longer than the depth the
request's measured acceptance gives (`longest`): such a match is a passage or loop that repeats whole.

Both lookups are dict hits, not scans: an index maps each n-gram to the end of its latest occurrence
that has a continuation. A sequence's index grows by max_n - min_n + 1 entries per new token, so a
proposal costs O(max_n + LONG_MATCH + k) and keeping it current O(new tokens * max_n).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from specdesk.engine.speculators.reply_store import ReplyStore

NGram = tuple[int, ...]
Tenant = str | None  # a request's cache salt: replies are only drafted from within the tenant that wrote them
# A match that reaches this far back is a passage the sequence repeats, mostly a loop: on the default model's
# greedy replies such a match's drafts of 12 tokens were accepted whole 85 % of the time, a 2-token match's of
# about 3.5 tokens 21 % (benchmarks.ngram_matches), so its draft may run longer than the request's depth.
LONG_MATCH = 16


@dataclass
class _SequenceIndex:
    """n-gram -> end of its latest occurrence (exclusive) with at least one token after it."""

    tokens: list[int] = field(default_factory=list)
    ends: dict[NGram, int] = field(default_factory=dict)


class NgramSpeculator:
    """Suffix lookup over the current sequence and the last `max_replies` assistant replies.

    propose(request_id, token_ids, k) is called every step with the request's full token list (prompt +
    output); the per-request index is updated incrementally and dropped by `release(request_id)`.
    `observe_reply(token_ids, tenant)` adds a finished reply to the store (the oldest reply of any tenant is
    evicted), where only the same tenant's proposals find it.
    """

    def __init__(
        self, max_n: int = 4, min_n: int = 2, max_replies: int = 256, max_reply_tokens: int = 1024,
        store: ReplyStore | None = None,
    ) -> None:  # fmt: skip
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.max_replies, self.max_reply_tokens = max_replies, max_reply_tokens
        self._sequences: dict[str, _SequenceIndex] = {}
        # Reply store: reply id -> (tenant, tokens) (insertion order = age), (tenant, n-gram) -> (reply id, end).
        self._replies: OrderedDict[int, tuple[Tenant, list[int]]] = OrderedDict()
        self._reply_ends: dict[tuple[Tenant, NGram], tuple[int, int]] = {}
        self._next_reply_id = 0
        self.store = store  # frozen: forget_replies / clear_replies leave it

    # ---- proposals ----------------------------------------------------------------------------------
    def propose(
        self, request_id: str, token_ids: Sequence[int], k: int, min_prob: float = 0.0, longest: int = 0,
        tenant: Tenant = None,
    ) -> list[int]:  # fmt: skip
        """Up to k tokens that followed the longest matching suffix before; [] when nothing matches. A walk of
        the frozen store stops where its chain's estimated chance of acceptance falls below min_prob
        (`ReplyStore.walk`). Where the sequence's own match reaches back LONG_MATCH tokens or more, its
        continuation may run to `longest` tokens instead of k. tenant: the request's cache salt."""
        if k <= 0:
            return []
        index = self._sync(request_id, token_ids)
        draft = self._lookup(index, k, longest, tenant)
        if len(draft) < k and self.store is not None:
            walked = self.store.walk(index.tokens, k, min_prob)
            if len(walked) > len(draft):
                return walked
        return draft

    def _lookup(self, index: _SequenceIndex, k: int, longest: int, tenant: Tenant) -> list[int]:
        """The sequence's own continuation, or the observed replies' where that is longer (see propose)."""
        tokens = index.tokens
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            suffix = tuple(tokens[-n:])
            # The sequence itself first: its own numbers and phrases are the likeliest to come back.
            end = index.ends.get(suffix)
            own: list[int] = []
            if end is not None:
                reach = k if longest <= k or not _matches_back(tokens, end, LONG_MATCH) else longest
                own = continuation(tokens, end, reach)
            if len(own) >= k:
                return own
            hit = self._reply_ends.get((tenant, suffix))
            other = self._replies[hit[0]][1][hit[1] : hit[1] + k] if hit is not None else []
            best = own if len(own) >= len(other) else other
            if best:
                return best
        return []

    def release(self, request_id: str) -> None:
        """Forget a request's index (finished, aborted or preempted)."""
        self._sequences.pop(request_id, None)

    # ---- the reply store ----------------------------------------------------------------------------
    def observe_reply(self, token_ids: Sequence[int], tenant: Tenant = None) -> None:
        """Remember a finished assistant reply (its first max_reply_tokens tokens) for `tenant`'s proposals."""
        tokens = [int(t) for t in token_ids[: self.max_reply_tokens]]
        if len(tokens) <= self.min_n:
            return
        reply_id = self._next_reply_id
        self._next_reply_id += 1
        self._replies[reply_id] = (tenant, tokens)
        for end in range(self.min_n, len(tokens)):  # n-grams that have a continuation token
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._reply_ends[tenant, tuple(tokens[end - n : end])] = (reply_id, end)
        while len(self._replies) > self.max_replies:
            self._evict_oldest()

    def clear_replies(self) -> None:
        """Forget every stored reply (running requests keep their own indexes)."""
        self._replies.clear()
        self._reply_ends.clear()

    @property
    def num_replies(self) -> int:
        return len(self._replies)

    @property
    def num_reply_ngrams(self) -> int:
        return len(self._reply_ends)

    def _evict_oldest(self) -> None:
        reply_id, (tenant, tokens) = self._replies.popitem(last=False)
        for end in range(self.min_n, len(tokens)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = (tenant, tuple(tokens[end - n : end]))
                if self._reply_ends.get(key, (None, 0))[0] == reply_id:
                    # A later reply would have overwritten the entry; this one is the only place left.
                    del self._reply_ends[key]

    # ---- the per-request index ----------------------------------------------------------------------
    def _sync(self, request_id: str, token_ids: Sequence[int]) -> _SequenceIndex:
        index = self._sequences.get(request_id)
        old = 0 if index is None else len(index.tokens)
        # Tokens only ever get appended; anything else (a reused id, a recompute) rebuilds the index.
        if index is None or old > len(token_ids) or (old and index.tokens[old - 1] != token_ids[old - 1]):
            index = self._sequences[request_id] = _SequenceIndex()
            old = 0
        tokens = index.tokens
        tokens.extend(int(t) for t in token_ids[old:])
        # A new token at position e gives the n-grams ending at e their continuation: index them now.
        for end in range(max(old, self.min_n), len(tokens)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index.ends[tuple(tokens[end - n : end])] = end
        return index


def _matches_back(tokens: list[int], end: int, length: int) -> bool:
    """Whether the `length` tokens before tokens[end] are the sequence's last `length`."""
    return end >= length and tokens[end - length : end] == tokens[-length:]


def continuation(tokens: list[int], end: int, k: int) -> list[int]:
    """Up to k tokens from tokens[end], where a suffix of the sequence matched the tokens before end. Where those
    run into the sequence's end and the match reaches back over the whole gap (the last 2 (len - end) tokens
    repeat the same len - end), the sequence is looping: the draft goes on around the loop."""
    period = len(tokens) - end
    if period >= k or not _matches_back(tokens, end, period):
        return tokens[end : end + k]
    return [tokens[end + i % period] for i in range(k)]
