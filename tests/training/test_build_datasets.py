"""Training and evaluation conversations: sizes, shape, variety, and no overlap between the splits."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from specdesk.prompts import load_conversations, load_dataset
from specdesk.training.build_datasets import (
    EVAL_PATH,
    MIN_WORDS_FOR_DUPLICATE,
    PIECES_PATH,
    build_train,
    check_disjoint,
    check_rows,
    main,
    read_jsonl,
)


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def test_sizes_and_shape() -> None:
    train, evaluation = load_conversations("train"), load_conversations("eval")
    assert len(train) >= 300 and len(evaluation) >= 40
    for messages in train + evaluation:
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "user"
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)


def test_eval_has_long_conversations_for_the_turn_five_benchmark() -> None:
    long_ones = [e for e in load_dataset("eval") if e.num_user_turns >= 5]
    assert len(long_ones) >= 5


def test_train_is_varied() -> None:
    entries = load_dataset("train")
    assert len({e.domain for e in entries}) >= 10
    assert len({e.intent for e in entries}) >= 15
    assert set(Counter(e.tone for e in entries)) >= {"angry", "polite", "confused", "terse", "non_native"}
    assert sum(e.num_user_turns > 1 for e in entries) >= len(entries) // 3  # plenty of multi-turn
    openers = [_normalize(e.messages[0]["content"]) for e in entries]
    assert len(set(openers)) == len(openers)


def test_train_and_eval_are_disjoint() -> None:
    train_texts = {
        _normalize(m["content"]) for messages in load_conversations("train") for m in messages if m["role"] == "user"
    }
    for messages in load_conversations("eval"):
        for message in messages:
            text = message["content"]
            if message["role"] == "user" and len(text.split()) >= MIN_WORDS_FOR_DUPLICATE:
                assert _normalize(text) not in train_texts, text
    train_ids = {e.id for e in load_dataset("train")}
    assert train_ids.isdisjoint(e.id for e in load_dataset("eval"))


def test_disjointness_check_catches_copies_and_paraphrases() -> None:
    train = build_train(json.loads(PIECES_PATH.read_text(encoding="utf-8")))
    evaluation = read_jsonl(EVAL_PATH)
    check_disjoint(train, evaluation)  # the committed split passes
    copied = {**train[0], "id": "eval-copy"}
    with pytest.raises(ValueError, match="repeats"):
        check_disjoint(train, [copied])
    opener = train[5]["messages"][0]["content"]
    paraphrase = {**copied, "messages": [{"role": "user", "content": "Hello again. " + opener}]}
    with pytest.raises(ValueError, match="paraphrases"):
        check_disjoint(train, [paraphrase])


def test_committed_train_file_is_what_the_builder_produces() -> None:
    assert main(["--check"]) == 0  # deterministic and up to date with pieces.json
    check_rows(read_jsonl(EVAL_PATH), "eval")


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        load_dataset("test")  # type: ignore[arg-type]
