"""benchmarks.feature_drafter: replies found in the positions, the second draft's batched attention, and a
drafter that learns what its data holds."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from benchmarks.feature_drafter import Drafter, _batch, evaluate, rotary, runs, train
from benchmarks.feature_drafter_walk import BEAM, BUDGETS, drafter_accepted
from specdesk.training.train_data import IGNORE, Positions

pytestmark = pytest.mark.usefixtures("restore_threads")

D, HEADS, INTER, VOCAB = 16, 2, 32, 40


def _drafter(seed: int = 0, draft: int = VOCAB) -> Drafter:
    torch.manual_seed(seed)
    embed = torch.randn(VOCAB, D)
    return Drafter(D, HEADS, INTER, embed[:draft], embed)


def _positions(replies: list[list[int]], seed: int = 0) -> Positions:
    """Positions of replies given as token lists: row j of a reply has input token x_{j+1} and targets x_{j+2},
    x_{j+3}, x_{j+4} (IGNORE past the end); random states; each reply its own history."""
    g = torch.Generator().manual_seed(seed)
    windows: list[list[int]] = []
    begin: list[int] = []
    end: list[int] = []
    history: list[int] = []
    for tokens in replies:
        start = len(history)
        history += tokens
        padded = tokens + [IGNORE] * 4
        for j in range(len(tokens) - 2):
            windows.append(padded[j + 1 : j + 5])
            begin.append(start)
            end.append(start + j + 1)
    n = len(windows)
    return Positions(torch.randn(n, D, generator=g).bfloat16(), torch.tensor(windows), torch.tensor(history),
                     torch.tensor(begin), torch.tensor(end))  # fmt: skip


def test_runs_split_the_positions_into_replies() -> None:
    data = _positions([[1, 2, 3, 4, 5], [6, 7, 8, 9], [1, 2, 3]])
    assert runs(data) == [(0, 3), (3, 2), (5, 1)]


def test_the_second_draft_attends_as_a_full_pass_over_its_own_sequence_would() -> None:
    model = _drafter()
    b, n = 2, 5
    state, tokens = torch.randn(b, n, D), torch.randint(0, VOCAB, (b, n))
    pred, x, k, v = model(state, tokens)
    guess = torch.randint(0, VOCAB, (b, n))
    got = model.second(pred, guess, k, v)
    for j in range(n):  # inputs 0..j, then the second draft's own input at position j + 1, causal
        seq = torch.cat([x[:, : j + 1], model.inputs(pred[:, j : j + 1], guess[:, j : j + 1])], dim=1)
        q, kk, vv = model.qkv_of(seq, torch.arange(j + 2))
        want = model.finish(seq, F.scaled_dot_product_attention(q, kk, vv, is_causal=True))[:, -1]
        torch.testing.assert_close(got[:, j], want, rtol=1e-4, atol=1e-5)


def test_rotary_keeps_norms_and_is_the_identity_at_position_zero() -> None:
    x = torch.randn(3, 2, 8)
    turned = rotary(x, torch.arange(3))
    torch.testing.assert_close(turned[0], x[0])
    torch.testing.assert_close(turned.norm(dim=-1), x.norm(dim=-1))


def _counting() -> Positions:
    """Every reply counts up by one: the next token is the input token plus one, whatever the state."""
    return _positions([[(s + i) % VOCAB for i in range(12)] for s in range(VOCAB)])


def _trained(data: Positions) -> Drafter:
    model = _drafter(seed=1)
    train(model, data, torch.arange(VOCAB), 1.0, epochs=30, batch=8, lr=1e-2, weight_decay=0.0, feature_weight=0.0,
          second_weight=1.0, seed=0)  # fmt: skip
    return model


def test_a_drafter_learns_a_rule_its_replies_follow() -> None:
    torch.set_num_threads(1)
    data, cols = _counting(), torch.arange(VOCAB)
    before = evaluate(_drafter(seed=1), data, cols, 1.0)
    after = evaluate(_trained(data), data, cols, 1.0)
    assert before["first_top1"] < 0.2
    assert after["first_top1"] > 0.9
    assert after["second_top1_given_first"] > 0.9
    assert after["positions"] == VOCAB * 10


def test_the_walk_accepts_what_each_tree_holds() -> None:
    torch.set_num_threads(1)
    data, cols = _counting(), torch.arange(VOCAB)
    for model in (_drafter(seed=1), _trained(data)):
        acc = drafter_accepted(model, data, cols, 1.0)
        for small, big in itertools.pairwise(BUDGETS):
            assert bool((acc[small] <= acc[big]).all())  # a bigger tree holds the smaller one
        # One node: the first draft alone, accepted exactly where it is right.
        b = _batch(data, runs(data), cols, VOCAB, 1.0)
        pred, *_ = model(b["state"], b["tokens"])
        right = (model.logits(pred).argmax(-1) == b["t1"])[b["ok"]].float()
        assert acc[1].tolist() == right.tolist()
    assert float(acc[8].mean()) > 1.8  # the trained one: both drafts in its tree nearly everywhere


def test_the_mlp_walk_accepts_what_its_trees_hold() -> None:
    from benchmarks.feature_drafter_walk import mlp_accepted
    from specdesk.engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=VOCAB, emb_dim=D, n_predict=3)).eval()
    data = _counting()
    acc = mlp_accepted(spec, data, 1.0)
    for small, big in itertools.pairwise(BUDGETS):
        assert bool((acc[small] <= acc[big]).all())
    # One node: head 0's top token alone.
    with torch.no_grad():
        state = spec.step(0, spec.scale(data.hidden.float()), data.windows[:, 0])
        right = (spec.logits(0, state).argmax(-1) == data.windows[:, 1]).float()
    assert acc[1].tolist() == right.tolist()
    assert bool((acc[8] <= 2).all()) and float(acc[8].sum()) > float(acc[1].sum())


def test_a_fraction_of_the_replies_keeps_each_one_whole() -> None:
    from benchmarks.feature_drafter import _some_replies

    data = _counting()
    half = _some_replies(data, 0.5)
    assert [n for _, n in runs(half)] == [10] * (VOCAB // 2)
    assert half.windows[:, 0].tolist() != data.windows[: len(half), 0].tolist()  # not simply the first half


def test_the_penalized_walk_matches_trees_built_one_path_at_a_time() -> None:
    """drafter_accepted against a reference that ranks each position's nodes (first drafts, and the children of
    the BEAM best with each path's own penalty) in plain Python and looks for the true path among the first m."""
    from specdesk.engine.logits_processors import penalize

    torch.set_num_threads(1)
    penalty, data, cols = 1.5, _positions([[(7 * s + 3 * i * i) % VOCAB for i in range(9)] for s in range(6)]), None
    cols = torch.arange(VOCAB)
    model = _drafter(seed=2)
    got = drafter_accepted(model, data, cols, penalty)
    b = _batch(data, runs(data), cols, VOCAB, penalty)
    with torch.no_grad():
        pred, _, k, v = model(b["state"], b["tokens"])
        lp1 = F.log_softmax(penalize(model.logits(pred), b["seen1"], penalty), -1)
        row = 0
        for r, (_, n) in enumerate(runs(data)):
            for j in range(n):
                s1, c1 = lp1[r, j].topk(max(BUDGETS))
                nodes = [(float(s), (int(c),)) for s, c in zip(s1, c1, strict=True)]
                for g in c1[:BEAM].tolist():
                    pred2 = model.second(pred, torch.full_like(b["tokens"], g), k, v)[r, j]
                    seen = b["seen1"][r, j].clone()
                    seen[g] = True
                    lp2 = F.log_softmax(penalize(model.logits(pred2), seen, penalty), -1)
                    s2, c2 = lp2.topk(max(BUDGETS))
                    first = float(lp1[r, j, g])
                    nodes += [(float(torch.tensor(first) + s), (g, int(c))) for s, c in zip(s2, c2, strict=True)]
                ranked = [p for _, p in sorted(nodes, key=lambda n: -n[0])]  # stable: parents, then children
                t1, t2 = int(b["t1"][r, j]), int(b["t2"][r, j])
                for m in BUDGETS:
                    tree = set(ranked[:m])
                    want = float((t1,) in tree) + float((t1,) in tree and t2 != IGNORE and (t1, t2) in tree)
                    assert float(got[m][row]) == want, (r, j, m)
                row += 1
    assert float(got[8].sum()) > float(got[1].sum())  # the trees found something beyond the first draft
