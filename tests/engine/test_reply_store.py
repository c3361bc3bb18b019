"""The frozen reply store (n-gram -> most frequent continuation) and the n-gram speculator's use of it."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import numpy as np
import pytest

from specdesk.engine.speculators.ngram import NgramSpeculator
from specdesk.engine.speculators.reply_store import FILE_NAME, ReplyStore, accuracy_of, find


def _counted_next(replies: list[list[int]], context: list[int], max_n: int, min_n: int) -> int | None:
    """The definition, by brute force: the longest n-gram that context ends with and that the replies hold with
    a continuation; its most frequent continuation, the smaller id on a tie."""
    for n in range(min(max_n, len(context)), min_n - 1, -1):
        gram = tuple(context[len(context) - n :])
        counts = collections.Counter(r[e] for r in replies for e in range(n, len(r)) if tuple(r[e - n : e]) == gram)
        if counts:
            top = max(counts.values())
            return min(t for t, c in counts.items() if c == top)
    return None


def test_most_frequent_continuation_of_the_longest_known_ngram() -> None:
    store = ReplyStore([[1, 2, 3, 4], [9, 2, 3, 5], [2, 3, 5, 6], [7, 7]], max_n=3, min_n=2)
    assert store.next_token([2, 3]) == 5  # [2, 3] -> 4 once, 5 twice
    assert store.next_token([1, 2, 3]) == 4  # the trigram [1, 2, 3] is known: it beats the bigram's count
    assert store.next_token([8, 2, 3]) == 5  # an unknown trigram falls back to the bigram
    assert store.next_token([3, 4]) is None  # 4 ends its reply: no continuation
    assert store.next_token([7, 7]) is None  # a whole reply of 2 tokens has no n-gram with a continuation
    assert store.next_token([3]) is None  # shorter than min_n
    # Each step continues the context, drafts included: [9, 2] -> 3, then [9, 2, 3] -> 5, [2, 3, 5] -> 6, and
    # neither [3, 5, 6] nor [5, 6] has a continuation.
    assert store.walk([0, 9, 2], 5) == [3, 5, 6]
    assert store.walk([0, 9, 2], 2) == [3, 5]
    assert store.walk([0, 1, 2], 5) == [3, 4]  # [1, 2, 3] is a known trigram: 4, where [2, 3] alone gives 5
    assert store.walk([42, 43], 3) == []


def test_random_replies_match_the_brute_force_definition() -> None:
    rng = random.Random(0)
    replies = [[rng.randrange(6) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    store = ReplyStore(replies, max_n=4, min_n=2)
    for _ in range(300):
        context = [rng.randrange(7) for _ in range(rng.randrange(0, 8))]
        assert store.next_token(context) == _counted_next(replies, context, 4, 2), context


def test_save_load_round_trip_and_find(tmp_path: Path) -> None:
    replies = [[5, 6, 7, 8], [], [1, 2, 3, 49151]]
    assert find(tmp_path) is None and find(None) is None
    ReplyStore.save(tmp_path / FILE_NAME, replies)
    assert find(tmp_path) == tmp_path / FILE_NAME
    assert ReplyStore.read(tmp_path / FILE_NAME) == replies
    loaded = ReplyStore.load(tmp_path / FILE_NAME)
    assert loaded.num_replies == 3 and loaded.num_tokens == 8
    assert loaded.walk([1, 2], 2) == [3, 49151]


def test_bad_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="min_n"):
        ReplyStore([[1, 2, 3]], max_n=2, min_n=3)


def test_the_ngram_speculator_walks_the_store_only_where_it_gives_more() -> None:
    store = ReplyStore([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24]], max_n=3, min_n=2)
    ng = NgramSpeculator(max_n=3, min_n=2, store=store)
    assert ng.propose("a", [1, 10, 11], 3) == [12, 13, 14]  # nothing of its own: the store
    # The sequence's own continuation of full length wins over the store.
    assert ng.propose("b", [10, 11, 99, 98, 97, 10, 11], 3) == [99, 98, 97]
    # A shorter own continuation (the sequence's [10, 11] is followed by 3 tokens) loses to a longer walk; an
    # equally long one is kept.
    assert ng.propose("c", [5, 10, 11, 7, 10, 11], 4) == [12, 13, 14, 15]
    assert ng.propose("d", [5, 10, 11, 7, 10, 11], 3) == [7, 10, 11]
    # A loop is followed around, as far as asked: it beats the store.
    assert ng.propose("loop", [5, 10, 11, 10, 11], 3) == [10, 11, 10]
    # Forgetting the observed replies keeps the frozen store.
    ng.observe_reply([30, 31, 32, 33])
    ng.clear_replies()
    assert ng.num_replies == 0 and ng.propose("e", [5, 20, 21], 2) == [22, 23]
    assert NgramSpeculator(max_n=3, min_n=2).propose("f", [5, 20, 21], 2) == []


def test_the_engine_drafts_from_its_speculator_folders_store_and_stays_exact(tmp_path: Path) -> None:
    """A speculator folder's replies.npz holding a reply the model gives: drafting from it, the engine accepts
    far more drafts than with the store turned off, and its greedy output is plain decoding's."""
    from specdesk.engine import LLM, SamplingParams
    from specdesk.engine.config import EngineConfig, SpecConfig
    from tests.tiny_models import make_tiny_model, make_tiny_speculator

    model = make_tiny_model("llama", tmp_path)
    mlp = make_tiny_speculator(model, tmp_path / "mlp")
    prompts = [[5, 17, 42, 8, 99, 3], [7, 7, 120, 64]]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = LLM(model=str(model), dtype="float32", device="cpu", speculator=None)
    try:
        expected = [o.token_ids for o in plain.generate(prompts, params)]
    finally:
        plain.shutdown()
    config = EngineConfig(model=str(model), speculator=f"{mlp}+ngram")
    accepted = {}
    # With the store; without it; with a table calling every store draft hopeless, which the walk then leaves out.
    for case, use_store, accuracy in (("store", True, None), ("none", False, None), ("hopeless", True, 0.0)):
        ReplyStore.save(mlp / FILE_NAME, expected, None if accuracy is None else np.full((3, 15), accuracy))
        spec_config = SpecConfig.resolve(config, "cpu")
        assert spec_config is not None and spec_config.reply_store == str(mlp / FILE_NAME)
        llm = LLM(model=str(model), dtype="float32", device="cpu", speculator=f"{mlp}+ngram",
                  spec_reply_store=use_store)  # fmt: skip
        try:
            assert [o.token_ids for o in llm.generate(prompts, params)] == expected
            accepted[case] = llm.stats().spec_num_accepted_tokens
        finally:
            llm.shutdown()
    assert accepted["store"] >= 40 and accepted["store"] > 2 * accepted["none"], accepted
    assert accepted["hopeless"] < accepted["store"] / 2, accepted


def test_classes_and_the_calibration_counts() -> None:
    # (1, 2) continues 3, 3, 4: share 2/3 (bucket 3 of 5), support 3+ -> class 3 * 3 + 2; (2, 3) ends two replies
    # and continues 9 once: share 1 (bucket 4), support 1 -> class 4 * 3 + 0.
    store = ReplyStore([[1, 2, 3], [1, 2, 3, 9], [1, 2, 4]], max_n=3, min_n=2)
    assert store.lookup([0, 1, 2]) == (3, 2, 11)
    assert store.lookup([2, 3]) == (9, 2, 12)
    assert store.lookup([1, 2, 3]) == (9, 3, 12)  # the trigram, occurring once with its continuation
    assert store.lookup([5, 6]) is None
    counts = store.calibrate([[1, 2, 4, 1, 2, 3]])
    # Positions 2..5: [1, 2] -> 3 (wrong: 4), [1, 2, 4] unknown and [2, 4] unknown, [2, 4, 1] and [4, 1] unknown,
    # [4, 1, 2] unknown then [1, 2] -> 3 (right).
    assert counts.shape == (2, 15, 2)
    assert counts[0, 11].tolist() == [2, 1] and counts.sum(axis=(0, 1)).tolist() == [2, 1]


def test_a_calibrated_walk_stops_where_its_chance_falls_below_min_prob() -> None:
    store = ReplyStore([[1, 2, 3, 4, 5, 6, 7, 8]] * 3, max_n=2, min_n=2)  # each bigram: share 1, support 3+: class 14
    assert store.walk([1, 2], 4, min_prob=0.5) == [3, 4, 5, 6]  # no table: min_prob does nothing
    store.accuracy = np.full((1, 15), 0.6)
    assert store.walk([1, 2], 4) == [3, 4, 5, 6]  # min_prob 0: the whole walk
    assert store.walk([1, 2], 4, min_prob=0.3) == [3, 4]  # 0.6, 0.36, then 0.216 < 0.3
    assert store.walk([1, 2], 4, min_prob=0.7) == []
    ng = NgramSpeculator(max_n=2, min_n=2, store=store)
    # The sequence's own continuation of [1, 2] has 4 tokens: a whole walk of 5 beats it, one cut to 1 does not.
    assert ng.propose("a", [1, 2, 9, 8, 1, 2], 5) == [3, 4, 5, 6, 7]
    assert ng.propose("b", [1, 2, 9, 8, 1, 2], 5, min_prob=0.5) == [9, 8, 1, 2]


def test_accuracy_is_cross_fitted_by_fold_and_saved_with_the_replies(tmp_path: Path) -> None:
    shared, other = [10, 11, 12, 13, 14], [20, 21, 22, 23]
    # Fold 0 and fold 1 both hold `shared`: each predicts the other's tokens; `other` is in fold 1 alone.
    accuracy = accuracy_of([shared, shared, other], folds=[0, 1, 1], max_n=2, min_n=2)
    # Fold 0's shared looked up in fold 1's store: 3 right lookups of class 12 (share 1, support 1); fold 1's
    # shared in fold 0's: 3 more; other's bigrams are in no other fold's store. (6 + 0.5) / (6 + 2).
    assert accuracy.shape == (1, 15) and accuracy[0, 12] == pytest.approx(6.5 / 8)
    assert accuracy[0, 14] == pytest.approx(0.25)  # never looked up: the prior
    ReplyStore.save(tmp_path / FILE_NAME, [shared, other], accuracy)
    loaded = ReplyStore.load(tmp_path / FILE_NAME, max_n=2, min_n=2)
    assert loaded.accuracy is not None and np.allclose(loaded.accuracy, accuracy)
    assert ReplyStore.load(tmp_path / FILE_NAME, max_n=3, min_n=2).accuracy is None  # a table for other lengths
    assert ReplyStore.read(tmp_path / FILE_NAME) == [shared, other]
