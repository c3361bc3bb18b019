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

from specdesk.engine import sampler
from specdesk.engine.nucleus import Kept, LazyRows
from specdesk.engine.sampler import probs_from_logits, sample_rows
from specdesk.engine.sampling_params import SamplingParams
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
SAMPLED = SamplingParams(temperature=1.0)  # rows sample from softmax(log p) = p


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """(statistic, bound): sum (observed - expected)^2 / expected over the categories with p > 0."""
    n = counts.sum()
    keep = p > 0
    expected = n * p[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    return stat, float(chi2.ppf(1 - ALPHA, int(keep.sum()) - 1))


def tree_trials(seed: int, params: SamplingParams = SAMPLED, lazy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of the first emitted token, and of the second one given the first was the draft 2.

    Tree: the root has children 2, 0, 4 (top-3 of some draft, deterministic); node 2 has children 1, 5.
    Every trial's rows are drawn in one `sample_rows` call, as an engine step draws a whole batch, and each
    tree is then walked on the host numbers: the engine's own path; or, lazy, each trial's rows drawn as its
    walk reaches them (`nucleus.LazyRows`, the CPU engine's path for top-p trees).
    """
    tree = build_tree([[2, 1], [2, 5], [0], [4]])  # rows: 1:2 2:1 3:5 4:0 5:4
    probs = torch.stack([P_ROOT, P_AFTER_2, P_OTHER, P_OTHER, P_OTHER, P_OTHER])
    children = [[tree.token(c) for c in row] for row in tree.children]
    n = tree.num_nodes + 1
    torch.manual_seed(seed)
    draws = sample_rows(probs.log().repeat(TRIALS, 1), [params] * n * TRIALS, [None] * n * TRIALS, children * TRIALS)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for t in range(TRIALS):
        rows = slice(t * n, (t + 1) * n)
        if lazy:
            one = LazyRows(probs.log(), [params] * n, [None] * n, children, sample_rows)
            acc = accept_sampled(tree, one.child_probs, one.uniforms, one.tokens)
        else:
            acc = accept_sampled(tree, draws.child_probs[rows], draws.uniforms[rows], draws.tokens[rows])
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


def test_tree_sampling_under_top_p_keeps_the_filtered_target() -> None:
    """Top-p rows on the CPU take the sampler's nucleus path, children and residual included: the emitted tokens
    follow softmax over filter_logits' set (top-p 0.7 keeps tokens 0, 2, 4 at the root, all of them children,
    and 1, 5, 3 after the draft 2, whose children are 1 and 5)."""
    top_p = SamplingParams(temperature=1.0, top_p=0.7)
    first, second = tree_trials(seed=0, params=top_p)
    for counts, p in ((first, P_ROOT), (second, P_AFTER_2)):
        target = probs_from_logits(p.log()[None], [top_p])[0]
        stat, bound = chi_square(counts, target)
        assert stat < bound, (stat, bound, counts.tolist(), target.tolist())


def test_lazily_drawn_tree_rows_keep_the_filtered_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same under top-p with each row drawn as the walk reaches it; a residual that keeps the rejected
    children is caught."""
    top_p = SamplingParams(temperature=1.0, top_p=0.7)
    first, second = tree_trials(seed=0, params=top_p, lazy=True)
    for counts, p in ((first, P_ROOT), (second, P_AFTER_2)):
        target = probs_from_logits(p.log()[None], [top_p])[0]
        stat, bound = chi_square(counts, target)
        assert stat < bound, (stat, bound, counts.tolist(), target.tolist())
    judge = Kept.judge
    monkeypatch.setattr(Kept, "judge", lambda self, children: (judge(self, children)[0], self))
    first, _ = tree_trials(seed=0, params=SamplingParams(temperature=1.0, top_p=0.95), lazy=True)
    target = probs_from_logits(P_ROOT.log()[None], [SamplingParams(temperature=1.0, top_p=0.95)])[0]
    stat, bound = chi_square(first, target)
    assert stat > bound, (stat, bound)


def test_chain_rejection_sampling_keeps_the_target_distribution() -> None:
    stat, bound = chi_square(chain_trials(seed=0), P_ROOT)
    assert stat < bound, (stat, bound)


def _no_renormalization(p_x: float, rejected_mass: float) -> float:
    return p_x  # judge later siblings against p, not p without the rejected ones: accepted too rarely


def _residual_keeps_rejected(probs: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return probs  # the residual draw after rejecting every child may emit a rejected child again


def _generous_accept(p_x: float, q_x: float) -> float:
    return min(1.0, 1.5 * p_x / q_x)


def _residual_is_p(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p


BROKEN_TREE: list[tuple[object, str, Callable]] = [
    (acceptance, "sibling_probability", _no_renormalization),
    (sampler, "without_tokens", _residual_keeps_rejected),
    (acceptance, "accept_probability", _generous_accept),
]


@pytest.mark.parametrize(
    ("module", "name", "broken"), BROKEN_TREE, ids=["no-renormalization", "rejected-come-back", "accept-rule"]
)
def test_broken_tree_variants_are_caught(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str, broken: Callable
) -> None:
    monkeypatch.setattr(module, name, broken)
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
    children = [[0, 1], [], []]

    def walk(probs: torch.Tensor) -> tuple[list[int], int]:
        draws = sample_rows(probs.log(), [SAMPLED] * 3, [None] * 3, children)
        return accept_sampled(tree, draws.child_probs, draws.uniforms, draws.tokens)

    torch.manual_seed(0)
    never = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]] * 3)  # the target never emits 0 or 1
    assert all(walk(never) == ([], 2) for _ in range(50))
    sure = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0] * 5 + [1.0]])
    assert all(walk(sure) == ([2], 5) for _ in range(50))  # certain second child, then row 2's own token


def test_rounding_that_leaves_no_residual_mass_still_emits_a_target_token() -> None:
    # The children hold all of p; if rounding rejects them all, the residual draw falls back to p (an
    # all-zero residual would make the race pick token 0, which p never emits).
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 20)
    draws = sample_rows(probs.log(), [SAMPLED] * 20, [None] * 20, [[1, 2]] * 20)
    assert draws.child_probs == [[0.5, 0.5]] * 20 and set(draws.tokens) <= {1, 2}
    tree = build_tree([[1], [2]])
    acc = accept_sampled(tree, [[0.5, 0.5], [], []], [[1.0, 1.0], [], []], [draws.tokens[0], 3, 3])
    assert acc == ([], draws.tokens[0])
