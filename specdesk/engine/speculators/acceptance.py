"""Verification: which draft tokens the base model keeps, and the one token it adds itself.

Greedy: walk down the tree while some child carries the base model's argmax; the argmax at the first
miss (or after the last accepted leaf) is the bonus token. Output = plain greedy decoding, token for token.

Sampled (temperature > 0), lossless speculative sampling (Leviathan et al. 2023, Chen et al. 2023):
a draft token x drawn from q is accepted with probability min(1, p(x) / q(x)); on rejection the next
token is drawn from the residual

    r(y) = max(p(y) - q(y), 0) / sum_y' max(p(y') - q(y'), 0),

so that P(emit y) = q(y) min(1, p/q) + (1 - sum_x min(q, p)) r(y) = min(q, p)(y) + max(p - q, 0)(y) = p(y).

Tree drafts are deterministic (top-k, not sampled): a child token x is a point mass q = delta_x, so it is
accepted with probability p(x); after rejecting x the residual is max(p - delta_x, 0) normalized, i.e. p
with x removed and renormalized, and that residual is the target for the next sibling (multi-draft
recursive rejection sampling, SpecTr / SpecInfer). Siblings carry distinct tokens x_1..x_m; with
S_j = p(x_1) + ... + p(x_j), sibling l is tried against p / (1 - S_{l-1}) and rejected with probability
(1 - S_l) / (1 - S_{l-1}); the product telescopes, so

    P(emit x_j) = (1 - S_{j-1}) * p(x_j) / (1 - S_{j-1}) = p(x_j),

and after rejecting all of them the final residual p restricted to the other tokens has the remaining
mass: every token keeps exactly probability p. Accepting a child descends to its row, where p is the base
distribution given that prefix, and the same rule applies again.

The tree walks run on the host over numbers drawn for every row of a step at once (`sampler.sample_rows`:
p(x) of each child, a uniform per child, one residual draw per row), so a walk touches no device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from specdesk.engine.speculators.tree import DraftTree


class Acceptance(NamedTuple):
    """The outcome of one verification: accepted draft rows (depth order) and the base model's own token.

    For a chain, rows are 1..num_accepted. Emitted tokens = the accepted rows' tokens + next_token.
    """

    accepted_rows: list[int]
    next_token: int

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_rows)


def accepted_tokens(tree: DraftTree, acceptance: Acceptance) -> list[int]:
    """Every token a verification emits, in order: accepted drafts, then the base model's token."""
    return [tree.token(r) for r in acceptance.accepted_rows] + [acceptance.next_token]


# ---- greedy -------------------------------------------------------------------------------------------
def accept_greedy(tree: DraftTree, target_argmax: Sequence[int] | torch.Tensor) -> Acceptance:
    """target_argmax[r]: the base model's argmax after row r (row 0 = the root), num_nodes + 1 entries."""
    # Indexed row by row, never copied whole: a lazily drawn sequence (nucleus.LazyRows) samples what is read.
    argmax = target_argmax.tolist() if isinstance(target_argmax, torch.Tensor) else target_argmax
    assert len(argmax) == tree.num_nodes + 1, (len(argmax), tree.num_nodes)
    rows: list[int] = []
    row = 0
    while True:
        target = int(argmax[row])
        match = next((c for c in tree.children[row] if tree.token(c) == target), None)
        if match is None:
            return Acceptance(rows, target)  # the bonus: the base model's own choice here
        rows.append(match)
        row = match


# ---- sampled ------------------------------------------------------------------------------------------
def accept_probability(p_x: float, q_x: float) -> float:
    """min(1, p(x) / q(x)); q(x) = 1 for a deterministic draft."""
    return 1.0 if p_x >= q_x else p_x / q_x


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(p - q, 0)) over the last dim. If nothing is left (p <= q everywhere, reachable only
    through rounding since then x was accepted with probability 1) fall back to p."""
    r = (p - q).clamp_(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


def sibling_probability(p_x: float, rejected_mass: float) -> float:
    """p(x) under the residual left once siblings of total mass S were rejected: p(x) / (1 - S).

    (p without the rejected tokens, renormalized; 1 when rounding left no mass, as x then holds all of it.)
    """
    left = 1.0 - rejected_mass
    return p_x / left if left > 0 else 1.0


def accept_sampled(
    tree: DraftTree, child_probs: Sequence[Sequence[float]], uniforms: Sequence[Sequence[float]],
    residual_tokens: Sequence[int],
) -> Acceptance:  # fmt: skip
    """Lossless multi-draft rejection sampling over a tree of deterministic drafts, on host data.

    Per tree row r (0 = the root), p_r being the base model's distribution after it as plain decoding would
    sample it (temperature / top-k / top-p applied): child_probs[r][j] = p_r(x_j) of its j-th child,
    uniforms[r][j] a U(0, 1) draw per child, residual_tokens[r] a draw from p_r without the row's children
    (what is left after rejecting all of them; p_r itself for a leaf). `sampler.sample_rows` draws all of
    them on the device for every row of a step at once.
    """
    assert len(child_probs) == len(uniforms) == len(residual_tokens) == tree.num_nodes + 1, (
        len(child_probs), len(uniforms), len(residual_tokens), tree.num_nodes,
    )  # fmt: skip
    rows: list[int] = []
    row = 0
    while True:
        rejected = 0.0  # S: the mass of the siblings rejected so far
        accepted = None
        for child, p_x, u in zip(tree.children[row], child_probs[row], uniforms[row], strict=True):
            if u < accept_probability(sibling_probability(p_x, rejected), 1.0):
                accepted = child
                break
            rejected += p_x  # the next sibling is judged against p with x removed
        if accepted is None:
            return Acceptance(rows, int(residual_tokens[row]))  # leaf or all children rejected
        rows.append(accepted)
        row = accepted


def rejection_sample(
    p: torch.Tensor, q: torch.Tensor, draft_tokens: Sequence[int], generator: torch.Generator | None = None
) -> Acceptance:
    """Chain speculative sampling for drafts sampled from full distributions.

    p [k + 1, vocab]: target distributions after the root and after each draft; q [k, vocab]: the draft
    distributions the k draft_tokens were sampled from. Accepted rows are 1..n.
    """
    k = len(draft_tokens)
    assert p.shape[0] == k + 1 and q.shape[0] == k, (p.shape, q.shape, k)
    for i, x in enumerate(draft_tokens):
        p_i, q_i = p[i].float(), q[i].float()
        if _uniform(generator, p.device) >= accept_probability(float(p_i[x]), float(q_i[x])):
            return Acceptance(list(range(1, i + 1)), _sample(residual(p_i, q_i), generator))
    return Acceptance(list(range(1, k + 1)), _sample(p[k].float(), generator))  # all accepted: a bonus


def _uniform(generator: torch.Generator | None, device: torch.device) -> float:
    device = device if generator is None else generator.device
    return float(torch.rand((), generator=generator, device=device))


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
