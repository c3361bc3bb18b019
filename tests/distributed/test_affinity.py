"""The routing key: every turn of a conversation gets its conversation's key; conversations that only
share a persona do not share a key (no ray needed)."""

from __future__ import annotations

import threading

from specdesk.distributed import affinity


def _render(messages: list[dict[str, str]]) -> list[int]:
    # A stand-in chat template: every character of every message, with a separator per message.
    return [t for m in messages for t in [0, *map(ord, m["role"] + m["content"])]]


SYSTEM = {"role": "system", "content": "You are a helpful agent for Northwind."}


def test_every_turn_of_a_conversation_has_the_same_key() -> None:
    turn1 = [SYSTEM, {"role": "user", "content": "Where is order 1234?"}]
    turn2 = [*turn1, {"role": "assistant", "content": "It ships today."}, {"role": "user", "content": "Thanks!"}]
    assert affinity.conversation_key(turn1, _render) == affinity.conversation_key(turn2, _render)


def test_a_shared_persona_prompt_alone_does_not_share_a_key() -> None:
    a = [SYSTEM, {"role": "user", "content": "Where is order 1234?"}]
    b = [SYSTEM, {"role": "user", "content": "I want a refund."}]
    assert affinity.conversation_key(a, _render) != affinity.conversation_key(b, _render)
    # Without any customer message the key is the whole prompt's, still never "the system prompt" by rule.
    assert affinity.conversation_key([SYSTEM], _render) == affinity.conversation_key([SYSTEM], _render)


def test_plain_prompts_are_keyed_on_their_first_pages() -> None:
    long = list(range(200))
    grown = [*long, 7, 8, 9]
    assert affinity.plain_key(long, 16) == affinity.plain_key(grown, 16)  # same first 4 pages
    assert affinity.plain_key(list(range(40)), 16) == affinity.plain_key(list(range(47)), 16)  # 2 full pages each
    assert affinity.plain_key(list(range(40)), 16) != affinity.plain_key(list(range(50)), 16)  # 2 vs 3 pages


def test_salt_separates_tenants_and_scope_overrides_per_context() -> None:
    assert affinity.salted("k", None) == "k"
    assert affinity.salted("k", "tenant-a") != affinity.salted("k", "tenant-b")
    seen: list[str | None] = []
    with affinity.routing_scope("conversation:7"):
        seen.append(affinity.scoped_routing_key())
        other = threading.Thread(target=lambda: seen.append(affinity.scoped_routing_key()))
        other.start()
        other.join()
    seen.append(affinity.scoped_routing_key())
    assert seen == ["conversation:7", None, None]  # a context variable: never leaks to other threads


def test_prompt_keys_are_bounded_and_found_by_ids() -> None:
    keys = affinity.PromptKeys(capacity=2)
    keys.remember([1, 2], "a")
    keys.remember([3], "b")
    keys.remember([4], "c")
    assert (keys.lookup([1, 2]), keys.lookup([3]), keys.lookup([4])) == (None, "b", "c")
