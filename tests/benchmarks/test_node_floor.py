"""benchmarks.node_floor's walk: the engine's steps over marked pools, priced as the engine pays."""

from __future__ import annotations

import math

import pytest

from benchmarks.node_floor import Turn, calibration, policies, walk


def _turn() -> Turn:
    """Four positions: a sure chain of two accepted at the first, an unsure wrong node at the others."""
    sure = [([5], math.log(0.9), True), ([5, 6], math.log(0.8), True), ([7], math.log(0.05), False)]
    unsure = [([1], math.log(0.1), False)]
    return [sure, unsure, unsure, unsure]


def test_walk_moves_by_accepted_nodes_and_prices_every_verified_one() -> None:
    # Top 1 everywhere: [5] accepted (2 tokens, to position 2), then two steps of 1 token with one node each.
    top1 = walk([_turn()], lambda n: n[:1], cost=0.2, proposal=0.1)
    assert top1["tokens_per_step"] == pytest.approx(4 / 3)
    assert top1["speed_vs_plain"] == pytest.approx(4 / (3 * 1.3))
    # A floor of 0.5 keeps the chain (3 tokens, to position 3) and verifies nothing at the last step.
    floor = walk([_turn()], lambda n: [x for x in n if x[1] >= math.log(0.5)], cost=0.2, proposal=0.1)
    assert floor == pytest.approx({"speed_vs_plain": 4 / (1 + 0.4 + 0.1 + 1.1), "tokens_per_step": 2.0,
                                   "nodes_per_step": 1.0})  # fmt: skip


def test_policies_walk_every_width_and_the_floor_at_the_cost() -> None:
    rows = {r["policy"]: r for r in policies([_turn()], cost=0.2, proposal=0.0, pool=3)}
    assert {"top 1", "top 2", "top 3", "floor 0.2 (the cost)", "floor 0.5"} <= set(rows)
    assert rows["floor 0.5"]["speed_vs_plain"] > rows["top 3"]["speed_vs_plain"]  # the wrong nodes cost, bring nothing


def test_calibration_bands_the_nodes_by_path_probability() -> None:
    bands = {b["probability_from"]: (b["nodes"], b["accepted"]) for b in calibration([_turn()])}
    assert bands == {0.0: (1, 0.0), 0.1: (3, 0.0), 0.8: (1, 1.0), 0.9: (1, 1.0)}
