"""The MLP ledger: each MLP step priced against itself without the MLP, and the rests it orders."""

from __future__ import annotations

import pytest

from specdesk.engine.speculators.mlp_ledger import MAX_REST_STEPS, MLPLedger, tokens_added


@pytest.mark.parametrize(
    ("emitted", "ngram", "added"),
    [
        ([7, 8, 9], [], 2),  # no n-gram draft: alone, the step would have emitted the model's token only
        ([7, 8, 9], [7, 8], 0),  # the n-gram draft carried the step: it and the bonus token
        ([7, 8, 9, 4], [7, 5], 2),  # the n-gram's first token, then the MLP's branch took two more
        ([3], [7, 8], 0),  # nothing accepted: one token either way
        ([7, 8, 9], [7, 8, 9, 1], 0),  # a longer n-gram draft accepted as far as the step went
    ],
)
def test_tokens_added_beyond_the_ngram_draft(emitted: list[int], ngram: list[int], added: int) -> None:
    assert tokens_added(emitted, ngram) == added


def test_the_ledger_says_nothing_until_it_has_steps() -> None:
    ledger = MLPLedger(rest_steps=15, decay=0.95, min_weight=8)
    for _ in range(9):  # a moving weight of 1 + 0.95 + ... reaches 8 on the tenth step
        ledger.record(0.02, 2, 0, 0.005)
    assert ledger.pays() is None
    ledger.record(0.02, 2, 0, 0.005)
    assert ledger.pays() is False


def test_a_costly_mlp_that_adds_little_rests_longer_each_time_and_is_probed_after() -> None:
    ledger = MLPLedger(rest_steps=15)
    for _ in range(20):  # 2.2 tokens in 20 ms, of them 0.2 the MLP's for 5 ms: 110 tok/s against 133 without
        ledger.record(0.02, 2, 0, 0.005)
        ledger.record(0.02, 3, 1, 0.005)
    rests = []
    for _ in range(6):
        assert ledger.pays() is False
        rests.append(ledger.next_rest())
        assert ledger.pays() is None  # no verdict until a probe step is in
        ledger.record(0.02, 2, 0, 0.005)
    assert rests == [15, 30, 60, 120, MAX_REST_STEPS, MAX_REST_STEPS]


def test_an_mlp_that_adds_more_than_it_costs_pays_and_its_rests_start_over() -> None:
    ledger = MLPLedger(rest_steps=15)
    for _ in range(10):  # costly at first ...
        ledger.record(0.02, 1, 0, 0.005)
    assert ledger.pays() is False and ledger.next_rest() == 15
    ledger.record(0.02, 1, 0, 0.005)
    assert ledger.pays() is False and ledger.next_rest() == 30
    for _ in range(60):  # ... then 3 tokens in 20 ms, 2 of them the MLP's for 5 ms: 150 tok/s against 67
        ledger.record(0.02, 3, 2, 0.005)
    assert ledger.pays() is True
    for _ in range(60):
        ledger.record(0.02, 1, 0, 0.005)
    assert ledger.pays() is False and ledger.next_rest() == 15  # a new losing streak starts at the shortest rest


def test_a_step_without_anything_left_for_the_ngram_is_no_evidence_against_the_mlp() -> None:
    ledger = MLPLedger(rest_steps=15)
    for _ in range(10):  # a fitted cost above the step's own time: a fit gone wrong
        ledger.record(0.01, 2, 1, 0.02)
    assert ledger.pays() is True
