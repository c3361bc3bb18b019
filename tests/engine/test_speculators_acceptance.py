"""Rejection sampling is lossless: emitted tokens follow the target distribution exactly.

Each test draws many verifications on a 6-token vocabulary and compares the empirical distribution of the
emitted tokens with p by a chi-square statistic. The same harness runs deliberately broken variants
(patched into the module) and must reject them: the test would catch those bugs in the real code.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from scipy.stats import chi2

from specdesk.engine.speculators import acceptance
from specdesk.engine.speculators.acceptance import accept_sampled, rejection_sample
from specdesk.engine.speculators.tree import build_tree

VOCAB = 6
TRIALS = 4000
# Fixed seeds make the outcome deterministic; the bound is the chi-square 1 - 1e-4 quantile, so a correct
# sampler fails only with a 1e-4 chance per seed and the broken ones are far beyond it.
ALPHA = 1e-4

P_ROOT = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
P_AFTER_2 = torch.tensor([0.10, 0.40, 0.05, 0.15, 0.10, 0.20])  # after the draft token 2 was accepted
P_OTHER = torch.full((VOCAB,), 1 / VOCAB)


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """(statistic, bound): sum (observed - expected)^2 / expected over the categories with p > 0."""
    n = counts.sum()
    keep = p > 0
    expected = n * p[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    return stat, float(chi2.ppf(1 - ALPHA, int(keep.sum()) - 1))


def tree_trials(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of the first emitted token, and of the second one given the first was the draft 2.

    Tree: the root has children 2, 0, 4 (top-3 of some draft, deterministic); node 2 has children 1, 5.
    """
    tree = build_tree([[2, 1], [2, 5], [0], [4]])  # rows: 1:2 2:1 3:5 4:0 5:4
    probs = torch.stack([P_ROOT, P_AFTER_2, P_OTHER, P_OTHER, P_OTHER, P_OTHER])
    g = torch.Generator().manual_seed(seed)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(TRIALS):
        acc = accept_sampled(tree, probs, g)
        emitted = [tree.token(r) for r in acc.accepted_rows] + [acc.next_token]
        first[emitted[0]] += 1
        if len(emitted) > 1 and emitted[0] == 2:
            second[emitted[1]] += 1
    return first, second


def chain_trials(seed: int) -> torch.Tensor:
    """Histogram of the first emitted token when 2 drafts are sampled from a full distribution q."""
    q = torch.tensor([[0.05, 0.30, 0.30, 0.05, 0.05, 0.25], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    p = torch.stack([P_ROOT, P_AFTER_2, P_OTHER])
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(VOCAB)
    for _ in range(TRIALS):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        acc = rejection_sample(p, q, drafts, g)
        first[drafts[0] if acc.num_accepted else acc.next_token] += 1
    return first


def test_tree_sampling_keeps_the_target_distribution() -> None:
    first, second = tree_trials(seed=0)
    stat, bound = chi_square(first, P_ROOT)
    assert stat < bound, (stat, bound, first / first.sum())
    stat, bound = chi_square(second, P_AFTER_2)  # descending into an accepted child samples its own p
    assert stat < bound, (stat, bound, second / second.sum())


def test_chain_rejection_sampling_keeps_the_target_distribution() -> None:
    stat, bound = chi_square(chain_trials(seed=0), P_ROOT)
    assert stat < bound, (stat, bound)


def _no_residual(p: torch.Tensor, token: int) -> torch.Tensor:
    return p  # judge the next sibling (and resample) against p itself: rejected tokens come back


def _unnormalized_residual(p: torch.Tensor, token: int) -> torch.Tensor:
    r = p.clone()
    r[token] = 0.0
    return r  # max(p - q, 0) without dividing by its mass: later siblings are accepted too rarely


def _generous_accept(p_x: float, q_x: float) -> float:
    return min(1.0, 1.5 * p_x / q_x)


def _residual_is_p(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p


BROKEN_TREE: list[tuple[str, Callable]] = [
    ("residual_without", _no_residual),
    ("residual_without", _unnormalized_residual),
    ("accept_probability", _generous_accept),
]


@pytest.mark.parametrize(("name", "broken"), BROKEN_TREE, ids=["p-not-residual", "no-renormalization", "accept-rule"])
def test_broken_tree_variants_are_caught(monkeypatch: pytest.MonkeyPatch, name: str, broken: Callable) -> None:
    monkeypatch.setattr(acceptance, name, broken)
    first, _ = tree_trials(seed=0)
    stat, bound = chi_square(first, P_ROOT)
    assert stat > bound, (name, stat, bound)


@pytest.mark.parametrize(("name", "broken"), [("residual", _residual_is_p), ("accept_probability", _generous_accept)])
def test_broken_chain_variants_are_caught(monkeypatch: pytest.MonkeyPatch, name: str, broken: Callable) -> None:
    monkeypatch.setattr(acceptance, name, broken)
    stat, bound = chi_square(chain_trials(seed=0), P_ROOT)
    assert stat > bound, (name, stat, bound)


def test_all_children_rejected_samples_outside_them() -> None:
    tree = build_tree([[0], [1]])
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]] * 3)  # the target never emits 0 or 1
    acc = accept_sampled(tree, probs, torch.Generator().manual_seed(0))
    assert acc == ([], 2)
    sure = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0] * 5 + [1.0]])
    assert accept_sampled(tree, sure, torch.Generator().manual_seed(0)) == ([2], 5)  # certain second child
