"""The routing key that keeps a conversation on one replica: the replica that holds its cached pages.

Every turn of a conversation starts with the same tokens: the system prompt and the first customer
message. The key hashes exactly those tokens (plus the cache tenant), so each turn of a conversation
gets the same key, while conversations that only share a persona's system prompt get different keys and
spread over the replicas (a key on the system prompt alone would pile every conversation of a persona
onto one replica). A caller that knows the conversation (the console: its id; `/v1`: `x-session-id` or
the `user` field) names it instead, through `routing_scope`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# The caller-chosen routing key of the current request; None: derive it from the prompt.
_routing_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("specdesk_routing_key", default=None)

# A plain-token prompt (no chat messages known) is keyed on at most this many leading pages.
MAX_PLAIN_PREFIX_PAGES = 4


@contextlib.contextmanager
def routing_scope(key: str | None) -> Iterator[None]:
    """Route every request submitted inside this block (same thread or asyncio task) by `key`."""
    token = _routing_key.set(key)
    try:
        yield
    finally:
        _routing_key.reset(token)


def scoped_routing_key() -> str | None:
    return _routing_key.get()


def conversation_key(messages: Sequence[dict[str, Any]], render: Callable[[list[dict[str, Any]]], list[int]]) -> str:
    """Hash of the rendered messages up to and including the first customer ("user") message.

    `render` is the chat template (messages -> token ids). Without a customer message every message counts.
    """
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages) - 1)
    return _digest(render(list(messages[: first_user + 1])))


def plain_key(token_ids: Sequence[int], block_size: int) -> str:
    """Key of a prompt given as tokens only: its first pages (at most MAX_PLAIN_PREFIX_PAGES).

    A prompt shorter than that is keyed on its whole length rounded down to a page (at least one page),
    so a prompt that grows turn by turn keeps its key once it has passed those pages.
    """
    limit = MAX_PLAIN_PREFIX_PAGES * block_size
    if len(token_ids) < limit:
        limit = max(block_size, len(token_ids) // block_size * block_size)
    return _digest(token_ids[:limit])


def salted(key: str, cache_salt: str | None) -> str:
    """Tenants never share cached pages, so their keys differ too (and spread, rather than pile up)."""
    return key if not cache_salt else f"{key}:{hashlib.sha256(cache_salt.encode()).hexdigest()[:16]}"


def _digest(token_ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()[:32]


class PromptKeys:
    """Remembers the conversation key of each prompt the chat template rendered, so `submit(ids)` finds
    the key of ids it is handed back. Bounded: the oldest entries go first."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._lock = threading.Lock()  # Gradio renders prompts on many threads

    def remember(self, token_ids: Sequence[int], key: str) -> None:
        ids = tuple(token_ids)
        with self._lock:
            self._keys[ids] = key
            self._keys.move_to_end(ids)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def lookup(self, token_ids: Sequence[int]) -> str | None:
        with self._lock:
            return self._keys.get(tuple(token_ids))
