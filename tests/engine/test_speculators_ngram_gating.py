"""The training-free n-gram speculator and the speculation policy. Pure Python, no model."""

from __future__ import annotations

import time

import pytest

from specdesk.engine.speculators.gating import GatingConfig, SpeculationPolicy, best_num_tokens, expected_tokens
from specdesk.engine.speculators.ngram import LONG_MATCH, NgramSpeculator


def test_continues_the_longest_earlier_suffix_in_the_sequence() -> None:
    ng = NgramSpeculator(max_n=4, min_n=2)
    seq = [1, 2, 3, 4, 5, 6, 9, 9, 2, 3, 4]
    # Suffix [2, 3, 4] occurred at positions 1..3, followed by 5, 6, 9.
    assert ng.propose("r", seq, 3) == [5, 6, 9]
    assert ng.propose("r", seq, 1) == [5]
    # The index grows with the sequence; the latest occurrence wins.
    seq += [7, 7, 2, 3, 4]
    assert ng.propose("r", seq, 2) == [7, 7]
    assert ng.propose("r", [8, 8, 8, 1], 3) == []  # a different token list under the same id: rebuilt
    assert ng.propose("fresh", [1, 2], 3) == []  # nothing seen before


def test_longer_suffix_beats_a_more_recent_shorter_one() -> None:
    ng = NgramSpeculator(max_n=3, min_n=2)
    seq = [1, 2, 3, 10, 11, 5, 2, 3, 20, 21, 1, 2, 3]
    assert ng.propose("r", seq, 2) == [10, 11]  # [1, 2, 3] beats the later [2, 3] -> 20


def test_a_loop_shorter_than_the_draft_is_followed_around() -> None:
    """Where the suffix's last occurrence is followed by fewer than k tokens and the match spans that whole gap
    (the sequence repeats its last period twice over), the draft repeats the period up to k; a gap the match
    does not span is not a loop, and its continuation stays as short as it is."""
    ng = NgramSpeculator(max_n=4, min_n=2)
    assert ng.propose("loop", [9, 1, 2, 3, 1, 2, 3], 8) == [1, 2, 3, 1, 2, 3, 1, 2]
    assert ng.propose("repeat", [4, 4, 4], 5) == [4, 4, 4, 4, 4]
    assert ng.propose("loop", [9, 1, 2, 3, 1, 2, 3], 2) == [1, 2]  # within the period: as before
    # [1, 2] last occurred before [7, 1, 2], but [5, 1, 2] != [7, 1, 2]: only those 3 tokens.
    assert ng.propose("gap", [9, 5, 1, 2, 7, 1, 2], 5) == [7, 1, 2]
    # The period's earlier copy must itself lie in the sequence: [3, 1, 2] after [1, 2] at its start is no loop.
    assert ng.propose("start", [1, 2, 3, 1, 2], 5) == [3, 1, 2]


def test_a_match_reaching_far_back_may_draft_up_to_longest() -> None:
    """A passage the sequence repeats (its match reaches LONG_MATCH tokens back) drafts up to `longest` tokens;
    an ordinary match keeps k, whatever `longest` says."""
    passage = list(range(100, 100 + LONG_MATCH))
    seq = [7, *passage, 1, 2, 3, 4, 5, 6, 7, 8, 9, *passage]
    ng = NgramSpeculator(max_n=4, min_n=2)
    assert ng.propose("long", seq, 2, longest=8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ng.propose("long", seq, 2) == [1, 2]  # no longest: k
    short = [7, 8, *passage[-LONG_MATCH + 1 :], 1, 2, 3, 4, 5, 6, 7, 8, 9, *passage]  # one token short of it
    assert ng.propose("short", short, 2, longest=8) == [1, 2]


def test_replies_store_is_used_across_conversations_and_bounded() -> None:
    ng = NgramSpeculator(max_n=3, min_n=2, max_replies=2)
    ng.observe_reply([50, 51, 52, 53, 54, 55])
    assert ng.propose("other", [7, 8, 51, 52], 3) == [53, 54, 55]
    ng.observe_reply([60, 61, 62, 63])
    ng.observe_reply([70, 71, 72, 73])  # evicts the first reply and its n-grams
    assert ng.num_replies == 2
    assert ng.propose("other2", [7, 8, 51, 52], 3) == []
    assert ng.propose("other3", [1, 61, 62], 2) == [63]
    assert ng.num_reply_ngrams == 2 * 3  # per reply: 2 bigrams + 1 trigram that have a continuation
    # Own-sequence continuation of full length is preferred to the store.
    ng.observe_reply([1, 2, 90, 91, 92])
    assert ng.propose("x", [1, 2, 5, 6, 7, 1, 2], 3) == [5, 6, 7]
    ng.release("x")


def test_a_reply_drafts_only_its_own_tenants_requests_and_eviction_spans_tenants() -> None:
    ng = NgramSpeculator(max_n=3, min_n=2, max_replies=2)
    ng.observe_reply([50, 51, 52, 53, 54, 55], tenant="alice")
    assert ng.propose("a", [7, 8, 51, 52], 3, tenant="alice") == [53, 54, 55]
    assert ng.propose("b", [7, 8, 51, 52], 3, tenant="bob") == []
    assert ng.propose("n", [7, 8, 51, 52], 3) == []  # no salt is a tenant of its own too
    ng.observe_reply([60, 61, 62], tenant="bob")
    ng.observe_reply([70, 71, 72])  # the oldest reply, alice's, goes: the bound is over all tenants
    assert ng.num_replies == 2 and ng.propose("a2", [7, 8, 51, 52], 3, tenant="alice") == []
    assert ng.propose("b2", [1, 60, 61], 1, tenant="bob") == [62]


def test_proposals_do_not_scan_the_sequence() -> None:
    ng = NgramSpeculator()
    seq = [i % 1000 for i in range(20000)]
    ng.propose("long", seq, 4)  # builds the index once
    start = time.perf_counter()
    for _ in range(2000):
        seq.append(seq[-1000])  # the text keeps repeating itself
        assert ng.propose("long", seq, 4) == seq[-1000:-996]
    assert time.perf_counter() - start < 1.0  # O(k + max_n) each, whatever the length


def test_expected_tokens_and_best_length() -> None:
    assert expected_tokens(0.5, 0) == 1 and expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert best_num_tokens(0.9, 4, 0.05) == 4
    assert best_num_tokens(0.02, 4, 0.05) == 0  # drafts that never land are not worth their cost
    assert best_num_tokens(0.3, 4, 0.2) == 1


def test_policy_thresholds_and_adaptive_length() -> None:
    policy = SpeculationPolicy(GatingConfig(max_tokens=3, probe_interval=4))
    assert policy.should_speculate(1, 0.1) and policy.should_speculate(16, 0.75)
    assert not policy.should_speculate(17, 0.1) and not policy.should_speculate(4, 0.8)
    assert policy.num_candidates(1) == 5 and policy.num_candidates(16) == 1
    assert policy.num_tokens("a") == 3  # optimistic prior
    for _ in range(30):
        policy.record("a", 3, 0)  # nothing ever accepted
    assert policy.acceptance_rate("a") < 0.05
    decisions = [policy.num_tokens("a") for _ in range(8)]
    assert decisions == [0, 0, 0, 1, 0, 0, 0, 1]  # off, with a probe every 4th step
    for _ in range(30):
        policy.record("a", 3, 3)
    assert policy.acceptance_rate("a") > 0.9 and policy.num_tokens("a") == 3
    policy.release("a")
    assert policy.acceptance_rate("a") == GatingConfig().prior_alpha


def test_step_cost_fits_the_slope_and_falls_back_to_the_prior() -> None:
    from specdesk.engine.speculators.tree_width import StepCost

    cost = StepCost(prior=0.04)
    for _ in range(40):
        cost.record(4, 0.040 * (1 + 0.1 * 3))  # always the same size: no slope to fit
    assert cost.cost_per_token == 0.04
    for i in range(200):
        tokens = 1 + (i % 16)
        cost.record(tokens, 0.040 * (1 + 0.1 * (tokens - 1)))
    assert abs(cost.cost_per_token - 0.1) < 1e-6
    cost.record(16, 0.5)  # a step that compiled a kernel: ignored, not fitted as the cost of its tokens
    assert abs(cost.cost_per_token - 0.1) < 1e-6
    for i in range(200):  # the machine got 5x slower for good and a token costs 20 %: the fit follows
        tokens = 1 + (i % 16)
        cost.record(tokens, 0.200 * (1 + 0.2 * (tokens - 1)))
    assert abs(cost.cost_per_token - 0.2) < 1e-6


def test_tree_width_measures_every_narrower_tree_and_weighs_cost() -> None:
    from specdesk.engine.speculators.tree_width import TreeWidth

    width = TreeWidth(max_candidates=3)
    assert width.choose(0.05, limit=3) == 3  # nothing measured: explore at full width
    truth = [7, 8, 9, 4]  # accepted 7, 8, 9 and the base model's own 4
    for _ in range(20):
        # The best-ranked path gets 1 token, the third gets all 3: only the full tree accepts 3.
        width.record(fixed=[], ranked=[[7, 1, 1], [2, 2, 2], [7, 8, 9]], emitted=truth)
    assert width.tokens_per_step(1) == pytest.approx(2.0) and width.tokens_per_step(3) == pytest.approx(4.0)
    assert width.choose(0.0, limit=3) == 3  # verification free: widest
    assert width.choose(0.0, limit=2) <= 2  # never above the load-based limit
    for _ in range(150):  # now the second path wins and the n-gram draft gets two tokens
        width.record(fixed=[[7, 8]], ranked=[[7, 1, 1], [7, 8, 9], [5, 5, 5]], emitted=truth)
    assert width.tokens_per_step(1) == pytest.approx(3.0, abs=0.01)
    assert width.tokens_per_step(2) == pytest.approx(4.0, abs=0.01)
    assert width.choose(0.05, limit=3) == 2  # same tokens, fewer nodes


def test_tree_width_credits_unverified_wider_trees_with_what_is_known() -> None:
    from specdesk.engine.speculators.tree_width import TreeWidth

    width = TreeWidth(max_candidates=3)
    # Only the top path was verified: it accepted 7 and the base model added 8. The third (unverified)
    # candidate holds 7, 8: it would have accepted both, so at least 3 tokens, but no more is known.
    width.record(fixed=[], ranked=[[7, 1], [2, 2], [7, 8, 9]], emitted=[7, 8])
    assert width.tokens_per_step(1) == pytest.approx(2.0)
    assert width.tokens_per_step(2) == pytest.approx(2.0)
    assert width.tokens_per_step(3) == pytest.approx(3.0)
    assert width.choose(0.0, limit=3) == 3


def test_tree_width_may_choose_no_candidate_where_allowed() -> None:
    """With allow_none, width 0 (a plain step) wins when no measured width beats one token per unit cost;
    without it the best width is chosen however poor."""
    from specdesk.engine.speculators.tree_width import TreeWidth

    for allow_none, expected in ((True, 0), (False, 1)):
        width = TreeWidth(3, allow_none=allow_none)
        for _ in range(20):  # the continuation is never drafted: every width accepts nothing
            width.record([], [[7], [8], [9]], [1, 2])
        assert width.choose(cost_per_token=0.2, limit=3) == expected
    width = TreeWidth(3, allow_none=True)
    for _ in range(20):  # the top candidate drafts the whole continuation: it pays
        width.record([], [[1, 2, 3], [8], [9]], [1, 2, 3, 4])
    assert width.choose(cost_per_token=0.2, limit=3) == 1


def test_measured_rest_rests_a_source_slower_than_undrafted_steps_and_measures_it_afresh() -> None:
    from specdesk.engine.speculators.gating import MeasuredRest

    gate = MeasuredRest(rest_steps=3, min_weight=4.0, decay=0.9)
    for _ in range(4):  # drafted: 1 token in 5.5 ms (182/s) against 1 token in 5 ms (200/s)
        gate.record(False, 1, 0.005)
        gate.record(True, 1, 0.0055)
    assert gate.due() and gate.resting == 0  # 3.4 steps of each: not yet
    gate.record(False, 1, 0.005)
    gate.record(True, 1, 0.0055)  # 4.1 steps of each: decided
    assert not gate.due() and not gate.due() and not gate.due() and gate.due()  # three proposals skipped
    assert gate.drafted == [0.0, 0.0, 0.0]  # measured afresh: no rest until min_weight drafted steps again
    for _ in range(4):  # now drafted steps pay: 2 tokens in 6 ms
        gate.record(True, 2, 0.006)
        assert gate.resting == 0
    paying = MeasuredRest(rest_steps=3, min_weight=4.0)
    for _ in range(20):
        paying.record(False, 1, 0.005)
        paying.record(True, 2, 0.007)
        assert paying.due()
    # Nothing decided before each side holds min_weight steps.
    early = MeasuredRest(rest_steps=3, min_weight=4.0, decay=0.9)
    for _ in range(3):
        early.record(True, 1, 1.0)
        early.record(False, 1, 0.001)
    assert early.due()


def test_a_pool_shorter_than_a_width_is_that_widths_tree() -> None:
    """A ranking that left its unlikely candidates out (spec_confident_nodes) is credited to every wider width as
    the whole pool, and an empty one as a step of one token and no node, so each width's mean covers every step."""
    from specdesk.engine.speculators.tree_width import TreeWidth

    width = TreeWidth(max_candidates=3, decay=1.0)  # plain means
    width.record([], [[7], [7, 8]], [7, 8, 9])  # two candidates: both verified, 7, 8 accepted, then 9
    width.record([], [], [4])  # none: the base model's token alone
    assert [width.tokens_per_step(m) for m in (1, 2, 3)] == pytest.approx([(2 + 1) / 2, (3 + 1) / 2, (3 + 1) / 2])
    assert [width.nodes_per_step(m) for m in (1, 2, 3)] == pytest.approx([1 / 2, 2 / 2, 2 / 2])
