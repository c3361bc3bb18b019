"""The MLP ledger: each MLP step priced against itself without the MLP, and the rests it orders."""

from __future__ import annotations

import pytest

from specdesk.engine.speculators.mlp_ledger import MAX_REST_STEPS, MLPLedger, nodes_off_draft, tokens_added
from specdesk.engine.speculators.tree import build_tree


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


def _judge(ledger: MLPLedger, steps: list[tuple[float, int, int, float]]) -> tuple[int, bool | None]:
    """Records the steps in turn until the ledger gives a verdict: (steps it took, the verdict)."""
    n = 0
    while ledger.pays() is None:
        ledger.record(*steps[n % len(steps)])
        n += 1
    return n, ledger.pays()


# 2.5 tokens in 20 ms, 0.5 of them the MLP's for 5 ms of it: 125 tokens/s, against 133 without it.
LOSING = [(0.02, 2, 0, 0.005), (0.02, 3, 1, 0.005)]
# 3 tokens in 20 ms, 2 of them the MLP's for 5 ms: 150 tokens/s, against 67 without it.
PAYING = [(0.02, 3, 2, 0.005)]


def test_a_costly_mlp_that_adds_little_rests_longer_each_time_and_is_judged_afresh_after() -> None:
    ledger = MLPLedger(rest_steps=15)
    rests = []
    for _ in range(6):  # each rest starts the sums over: ten steps of the MLP's own judge it again
        assert _judge(ledger, LOSING) == (10, False)
        rests.append(ledger.next_rest())
    assert rests == [15, 30, 60, 120, MAX_REST_STEPS, MAX_REST_STEPS]


def test_an_mlp_that_pays_again_after_a_rest_is_back_at_once_and_its_rests_start_over() -> None:
    ledger = MLPLedger(rest_steps=15)
    assert _judge(ledger, LOSING) == (10, False) and ledger.next_rest() == 15
    assert _judge(ledger, LOSING) == (10, False) and ledger.next_rest() == 30
    assert _judge(ledger, PAYING) == (10, True)  # the text turned predictable: the old verdict is gone
    for _ in range(60):
        ledger.record(*LOSING[0])
    assert ledger.pays() is False and ledger.next_rest() == 15  # a new losing streak starts at the shortest rest


def test_a_step_without_anything_left_for_the_ngram_is_no_evidence_against_the_mlp() -> None:
    ledger = MLPLedger(rest_steps=15)
    for _ in range(10):  # a fitted cost above the step's own time: a fit gone wrong
        ledger.record(0.01, 2, 1, 0.02)
    assert ledger.pays() is True


def test_the_mlp_s_nodes_are_those_off_the_ngram_draft_s_path() -> None:
    # paths: the n-gram draft [7, 8, 9] first, then the MLP's [7, 8, 4] and [5]: two nodes off the draft.
    tree = build_tree([[7, 8, 9], [7, 8, 4], [5]])
    assert nodes_off_draft(tree, [7, 8, 9]) == 2
    assert nodes_off_draft(tree, []) == tree.num_nodes == 5
    # A grammar pruned the draft's first token: its other nodes went with it, and every node left is the MLP's.
    assert nodes_off_draft(build_tree([[5], [6, 1]]), [7, 8, 9]) == 3
