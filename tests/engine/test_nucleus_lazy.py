"""A tree's rows drawn as the verification walk reaches them (nucleus.LazyRows): the same tokens as the eager
draw for a seeded request, no row past the first rejection drawn, no residual drawn where a child is accepted,
and a broken row failing the walk only where the walk reaches it."""

from __future__ import annotations

import pytest
import torch

from specdesk.engine.nucleus import BrokenRow, LazyRows
from specdesk.engine.sampler import make_generator, sample_rows
from specdesk.engine.sampling_params import SamplingParams
from specdesk.engine.speculators.acceptance import accept_greedy, accept_sampled
from specdesk.engine.speculators.tree import build_tree

V = 49152
TOP_P = SamplingParams(temperature=0.7, top_p=0.9)


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_a_seeded_tree_walks_to_the_eager_draws_tokens() -> None:
    tree = build_tree([[7, 8, 9], [7, 11]])  # rows 1:7 2:8 3:9 4:11
    logits = _rows(tree.num_nodes + 1)
    seeded = SamplingParams(temperature=0.7, top_p=0.9, seed=5)
    n = tree.num_nodes + 1
    eager = sample_rows(logits, [seeded] * n, [make_generator(100 + r, "cpu") for r in range(n)], [[]] * n).tokens
    # Drafts that match the eager draws: the walk accepts 7 then 8, so it reads rows 0, 1 and 2.
    tree = build_tree([[eager[0], eager[1], 9], [eager[0], 11]])
    lazy = LazyRows(logits, [seeded] * n, [make_generator(100 + r, "cpu") for r in range(n)], [[]] * n, sample_rows)
    acc = accept_greedy(tree, lazy.tokens)
    assert acc == accept_greedy(tree, eager)
    assert [lazy.tokens[r] for r in range(n)] == eager  # every row, read now, as the eager draw has it


def test_rows_past_the_first_rejection_are_never_drawn() -> None:
    logits = _rows(4)
    outside = int(logits[0].argmin())  # far outside row 0's nucleus: probability 0, always rejected
    tree = build_tree([[outside, 5, 6]])
    lazy = LazyRows(
        logits, [TOP_P] * 4, [None] * 4, [[tree.token(c) for c in row] for row in tree.children], sample_rows
    )
    acc = accept_sampled(tree, lazy.child_probs, lazy.uniforms, lazy.tokens)
    assert acc.accepted_rows == [] and acc.next_token != outside
    assert sorted(lazy._rows) == [0] and lazy.child_probs[0] == [0.0]


def test_an_accepted_child_draws_no_residual() -> None:
    logits = _rows(2)
    logits[0, 42] = 1000.0  # row 0 is all token 42: its child 42 is accepted with probability 1
    tree = build_tree([[42]])
    lazy = LazyRows(logits, [TOP_P] * 2, [None] * 2, [[42], []], sample_rows)
    acc = accept_sampled(tree, lazy.child_probs, lazy.uniforms, lazy.tokens)
    assert acc.accepted_rows == [1] and lazy._rows[0].token is None and lazy._rows[1].token == acc.next_token


def test_a_broken_row_fails_the_walk_only_where_it_is_reached() -> None:
    logits = _rows(3)
    logits[2, 7] = float("nan")  # the row after the draft at row 2
    outside = int(logits[0].argmin())
    rejected = build_tree([[outside], [9]])  # rows 1:outside 2:9 (both children of the root)
    children = [[outside, 9], [], []]
    logits[0, 9] = -1000.0  # 9 is outside the nucleus too: both rejected, row 2 never read
    lazy = LazyRows(logits, [TOP_P] * 3, [None] * 3, children, sample_rows)
    assert accept_sampled(rejected, lazy.child_probs, lazy.uniforms, lazy.tokens).accepted_rows == []
    logits[0, 9] = 1000.0  # now 9 is row 0's only token: accepted, and row 2 is read
    lazy = LazyRows(logits, [TOP_P] * 3, [None] * 3, children, sample_rows)
    with pytest.raises(BrokenRow, match="NaN or infinite"):
        accept_sampled(rejected, lazy.child_probs, lazy.uniforms, lazy.tokens)


def test_only_cpu_top_p_rows_apply() -> None:
    logits = _rows(1)
    assert LazyRows.applies(logits, [TOP_P])
    for other in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7),
                  SamplingParams(temperature=0.7, top_p=0.9, top_k=5),
                  SamplingParams(temperature=0.7, top_p=0.9, min_p=0.1)):  # fmt: skip
        assert not LazyRows.applies(logits, [other])


def test_a_row_wider_than_the_spans_takes_the_full_draw() -> None:
    """3.7e-5 of the mass lies 21 below the top, past every span: top-p 0.99999 needs some of it."""
    logits = torch.zeros(2, V)
    logits[:, 3] = 21.0
    wide = SamplingParams(temperature=1.0, top_p=0.99999)
    calls = []

    def full_draw(*args: object) -> object:
        calls.append(args)
        return sample_rows(*args)  # type: ignore[arg-type]  # the draw's own arguments

    lazy = LazyRows(logits, [wide] * 2, [None] * 2, [[3], []], full_draw)
    assert 0.9999 < lazy.child_probs[0][0] < 1.0  # p(3) over the full filter's kept set
    assert len(calls) == 1 and isinstance(lazy.tokens[0], int) and len(calls) == 1  # drawn with the row, once
