"""fit_to_context: oldest whole turns go first, the system prompt and the last question never do."""

from __future__ import annotations

import random

import pytest

from specdesk.prompts import ContextOverflowError, fit_to_context

SYSTEM = {"role": "system", "content": "s " * 10}


def words(messages: list[dict[str, str]]) -> int:
    # A chat-template-like count: content words plus 3 tokens of framing per message.
    return sum(len(m["content"].split()) + 3 for m in messages)


def conversation(num_turns: int, words_per_message: int = 10) -> list[dict[str, str]]:
    messages = [SYSTEM]
    for turn in range(num_turns):
        messages.append({"role": "user", "content": f"q{turn} " * words_per_message})
        messages.append({"role": "assistant", "content": f"a{turn} " * words_per_message})
    messages.append({"role": "user", "content": "last question " * 5})
    return messages


def test_fits_already() -> None:
    messages = conversation(2)
    assert fit_to_context(messages, words, 10_000) == (messages, 0)


def test_drops_oldest_pairs_and_keeps_alignment() -> None:
    messages = conversation(6)
    kept, num_dropped = fit_to_context(messages, words, 70)
    assert kept[0] == SYSTEM
    assert kept[1]["role"] == "user"
    assert num_dropped % 2 == 0 and num_dropped > 0
    assert kept == [SYSTEM, *messages[1 + num_dropped :]]
    assert words(kept) <= 70
    # Minimal: keeping one more pair would not fit.
    assert words([SYSTEM, *messages[1 + num_dropped - 2 :]]) > 70


def test_keeps_system_and_last_user_message_or_raises() -> None:
    messages = conversation(3)
    kept, num_dropped = fit_to_context(messages, words, words([SYSTEM, messages[-1]]))
    assert kept == [SYSTEM, messages[-1]] and num_dropped == 6
    with pytest.raises(ContextOverflowError, match="too long") as info:
        fit_to_context(messages, words, words([SYSTEM, messages[-1]]) - 1)
    assert isinstance(info.value, ValueError)
    assert info.value.max_tokens == words([SYSTEM, messages[-1]]) - 1


def test_leading_greeting_and_trailing_reply_are_handled() -> None:
    greeting = {"role": "assistant", "content": "Hi, how can I help? " * 5}
    question = {"role": "user", "content": "Where is my parcel"}
    partial = {"role": "assistant", "content": "Let me"}  # e.g. continuing a stopped reply
    messages = [SYSTEM, greeting, question, partial]
    kept, num_dropped = fit_to_context(messages, words, words([SYSTEM, question, partial]))
    assert (kept, num_dropped) == ([SYSTEM, question, partial], 1)


def test_without_system_prompt() -> None:
    messages = conversation(4)[1:]
    kept, num_dropped = fit_to_context(messages, words, 40)
    assert kept[0]["role"] == "user" and kept[-1] == messages[-1]
    assert kept == messages[num_dropped:]


def test_counts_tokens_only_logarithmically_often() -> None:
    calls = 0

    def counting(messages: list[dict[str, str]]) -> int:
        nonlocal calls
        calls += 1
        return words(messages)

    fit_to_context(conversation(200), counting, 500)
    assert calls <= 12


def test_matches_a_brute_force_search_on_random_conversations() -> None:
    rng = random.Random(0)
    for _ in range(200):
        messages = [SYSTEM]
        for _turn in range(rng.randint(0, 8)):
            messages.append({"role": "user", "content": "u " * rng.randint(1, 30)})
            for _reply in range(rng.randint(0, 2)):  # 0-2 replies: alignment must not assume pairs
                messages.append({"role": "assistant", "content": "a " * rng.randint(1, 30)})
        messages.append({"role": "user", "content": "q " * rng.randint(1, 30)})
        budget = rng.randint(10, 300)
        starts = [i for i, m in enumerate(messages) if i == 1 or m["role"] == "user"]
        fitting = [s for s in starts if words([SYSTEM, *messages[s:]]) <= budget]
        if not fitting:
            with pytest.raises(ContextOverflowError):
                fit_to_context(messages, words, budget)
            continue
        kept, num_dropped = fit_to_context(messages, words, budget)
        assert num_dropped == fitting[0] - 1
        assert kept == [SYSTEM, *messages[fitting[0] :]]


def test_rejects_a_non_positive_budget() -> None:
    with pytest.raises(ValueError, match="positive"):
        fit_to_context(conversation(1), words, 0)
