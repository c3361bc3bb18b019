"""Sampler: greedy = argmax, filters = HF warpers, seeded rows reproducible alone, draws follow the target."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdesk.engine.sampler import (
    filter_logits,
    make_generator,
    probs_from_logits,
    sample,
    sample_from_probs,
    sample_rows,
    without_tokens,
)
from specdesk.engine.sampling_params import SamplingParams

GREEDY = SamplingParams()


def hf_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What HF `generate` does to one row's scores, in its order: temperature, top-k, top-p."""
    scores = logits.unsqueeze(0)
    scores = TemperatureLogitsWarper(p.temperature)(None, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return scores[0]


def test_greedy_is_first_argmax() -> None:
    logits = torch.randn(5, 37)
    logits[2, 4] = logits[2, 30] = logits[2].max() + 1.0  # a tie: the first index wins, like HF
    out = sample(logits, [GREEDY] * 5, [None] * 5)
    assert out.dtype == torch.int64
    assert out.tolist() == logits.argmax(dim=-1).tolist()
    assert out[2].item() == 4


def test_greedy_rows_ignore_generators_and_mixed_batches() -> None:
    logits = torch.randn(4, 50)
    params = [GREEDY, SamplingParams(temperature=1.0, seed=1), GREEDY, SamplingParams(temperature=0.5)]
    gens = [make_generator(7, "cpu"), make_generator(1, "cpu"), None, None]
    out = sample(logits, params, gens)
    assert out[0].item() == logits[0].argmax().item()
    assert out[2].item() == logits[2].argmax().item()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.6),
        SamplingParams(temperature=2.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=0.01),
        SamplingParams(temperature=1.0, top_p=1e-9),  # 1 - p rounds to 1.0 in float32: the top must survive
        SamplingParams(temperature=1.0, top_k=500),  # k larger than the vocabulary keeps everything
    ],
)
def test_filter_matches_transformers_warpers(params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 64, generator=gen) * 3
    mine = filter_logits(logits, [params] * 6)
    for row in range(6):
        expected = hf_filter(logits[row], params)
        assert torch.equal(torch.isinf(mine[row]), torch.isinf(expected)), row
        assert torch.equal(mine[row], expected), row


def test_top_p_boundary_mass_exactly_p_is_enough() -> None:
    # Four equal logits: cumulative mass is exactly 0.25, 0.5, 0.75, 1. With p = 0.5 the smallest top set with
    # mass >= p has two tokens (HF drops c_j <= 1 - p, so the tie at 0.5 is dropped).
    logits = torch.zeros(1, 4)
    params = SamplingParams(temperature=1.0, top_p=0.5)
    kept = torch.isfinite(filter_logits(logits, [params])[0])
    assert int(kept.sum()) == int(torch.isfinite(hf_filter(logits[0], params)).sum()) == 2


def test_filter_mixed_rows_match_transformers_row_by_row() -> None:
    # One vectorized call over rows with different settings must equal HF applied to each row alone.
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 100, generator=gen) * 2
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=10),
        SamplingParams(temperature=1.5, top_p=0.7),
        SamplingParams(temperature=0.9, top_k=3, top_p=0.95),
        SamplingParams(temperature=1.1, top_k=0, top_p=0.5),
    ]
    mine = filter_logits(logits, params)
    for row, p in enumerate(params):
        assert torch.equal(mine[row], hf_filter(logits[row], p)), row


@pytest.mark.parametrize("spread", [6.0, 0.5])  # peaked rows take the top-1024 path, flat ones sort everything
def test_filter_on_a_real_vocabulary_size_matches_transformers(spread: float) -> None:
    from specdesk.engine.sampler import _filter_among_top

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 49152, generator=gen) * spread
    params = [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=0.8, top_k=50),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.95),
        SamplingParams(temperature=1.2, top_p=0.8),
        SamplingParams(temperature=0.7, top_p=0.9),
    ]
    scaled = logits / torch.tensor([p.temperature for p in params])[:, None]
    assert (_filter_among_top(scaled, params) is not None) == (spread > 1)
    # top-k past the prefilter renormalizes over its own k tokens: the full sort handles it
    assert _filter_among_top(scaled, [*params[:5], SamplingParams(temperature=1.2, top_k=2000, top_p=0.8)]) is None
    mine = filter_logits(logits, params)
    for row, p in enumerate(params):
        expected = hf_filter(logits[row], p)
        assert torch.equal(torch.isinf(mine[row]), torch.isinf(expected)), row
        assert torch.allclose(mine[row][torch.isfinite(expected)], expected[torch.isfinite(expected)]), row


def test_probs_from_logits_greedy_one_hot_and_sampled_softmax() -> None:
    logits = torch.randn(3, 40)
    params = [GREEDY, SamplingParams(temperature=0.8, top_k=7), SamplingParams(temperature=1.2, top_p=0.8)]
    probs = probs_from_logits(logits, params)
    assert probs.shape == (3, 40) and probs.dtype == torch.float32
    assert probs[0].sum().item() == 1.0 and probs[0, logits[0].argmax()].item() == 1.0
    for row in (1, 2):
        torch.testing.assert_close(probs[row], hf_filter(logits[row], params[row]).softmax(-1))
    assert (probs[1] > 0).sum().item() == 7


def test_seeded_row_is_reproducible_whatever_the_batch() -> None:
    vocab = 300
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    steps = [torch.randn(1, vocab) for _ in range(6)]

    gen = make_generator(seeded.seed, "cpu")
    alone = [sample(step, [seeded], [gen]).item() for step in steps]

    # Same row at position 2 of a batch with greedy, unseeded and differently seeded neighbours.
    others = [GREEDY, SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=4, seed=99)]
    gens = [None, None, make_generator(seeded.seed, "cpu"), make_generator(99, "cpu")]
    batched = []
    for step in steps:
        logits = torch.cat([torch.randn(2, vocab), step, torch.randn(1, vocab)])
        batched.append(sample(logits, [others[0], others[1], seeded, others[2]], gens)[2].item())
    assert batched == alone

    again = make_generator(seeded.seed, "cpu")
    assert [sample(step, [seeded], [again]).item() for step in steps] == alone


def test_different_seeds_give_different_streams() -> None:
    logits = torch.zeros(1, 1000)  # uniform: two seeds agreeing 8 times is (1/1000)^8
    params = [SamplingParams(temperature=1.0)]
    gen_a, gen_b = make_generator(1, "cpu"), make_generator(2, "cpu")
    draws_a = [sample(logits, params, [gen_a]).item() for _ in range(8)]
    draws_b = [sample(logits, params, [gen_b]).item() for _ in range(8)]
    assert draws_a != draws_b


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# chi-square critical values at p = 0.001 by degrees of freedom (fixed seeds make the tests deterministic)
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.5, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.8),
    ],
)
def test_draws_follow_the_target_distribution(params: SamplingParams) -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]])
    target = probs_from_logits(logits, [params])[0]
    num_draws = 20_000
    draws = sample(logits.expand(num_draws, -1), [params] * num_draws, [None] * num_draws)
    counts = torch.bincount(draws, minlength=8).float()
    assert counts[target == 0].sum().item() == 0, "sampled a filtered-out token"
    df = int((target > 0).sum().item()) - 1
    assert chi_square(counts, target) < CHI2_999[df], (counts, target)


def test_seeded_draws_follow_softmax_over_temperature() -> None:
    # The per-row generator path: every row has its own seed.
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0, 0.8])
    probs = torch.softmax(logits / 0.9, dim=-1).expand(8000, -1).contiguous()
    gens = [make_generator(seed, "cpu") for seed in range(8000)]
    counts = torch.bincount(sample_from_probs(probs, gens), minlength=5).float()
    assert chi_square(counts, probs[0]) < CHI2_999[4], counts


def test_make_generator_none_without_seed() -> None:
    assert make_generator(None, "cpu") is None
    gen = make_generator(5, torch.device("cpu"))
    assert isinstance(gen, torch.Generator) and gen.initial_seed() == 5


def test_sample_rows_equals_plain_sampling_row_by_row() -> None:
    """A step's one call: greedy rows take the argmax, seeded rows draw exactly what `sample` draws alone
    with the same generator (whatever shares the call, children of other rows included), and sampled rows
    with children report p of each child and a uniform per child."""
    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(6, vocab)
    seeded = SamplingParams(temperature=0.9, top_k=40, seed=5)
    unseeded = SamplingParams(temperature=1.1, top_p=0.9)
    params = [GREEDY, seeded, unseeded, seeded, unseeded, GREEDY]
    children = [[1, 2], [], [7, 8, 9], [], [], [3]]  # a greedy row's children change nothing
    gens = [None, make_generator(11, "cpu"), None, make_generator(12, "cpu"), None, None]
    draws = sample_rows(logits, params, gens, children)
    assert draws.is_finite == [True] * 6
    assert [draws.tokens[i] for i in (0, 5)] == logits[[0, 5]].argmax(-1).tolist()
    for row, seed in ((1, 11), (3, 12)):
        assert draws.tokens[row] == sample(logits[row : row + 1], [seeded], [make_generator(seed, "cpu")]).item()
    p = filter_logits(logits[2:3], [unseeded]).softmax(-1)[0]
    torch.testing.assert_close(torch.tensor(draws.child_probs[2], dtype=torch.float64), p[[7, 8, 9]].double())
    assert len(draws.uniforms[2]) == 3 and all(0.0 <= u < 1.0 for u in draws.uniforms[2])
    assert draws.child_probs[4] == [] and draws.uniforms[4] == []


def test_sample_rows_residual_draw_never_emits_a_child() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0, 0.5]]).expand(4000, -1)
    draws = sample_rows(logits, [SamplingParams(temperature=1.0)] * 4000, [None] * 4000, [[0, 1]] * 4000)
    counts = torch.bincount(torch.tensor(draws.tokens), minlength=5).float()
    assert counts[:2].sum().item() == 0
    residual = torch.softmax(logits[0], -1)[2:]
    assert chi_square(counts[2:], residual / residual.sum()) < CHI2_999[3], counts


@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
def test_sample_rows_flags_a_row_it_cannot_sample_and_only_that_row(bad: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    seeded = SamplingParams(temperature=0.8, seed=3)
    params = [GREEDY, SamplingParams(temperature=0.7), GREEDY, seeded]
    broken = logits.clone()
    if bad == "all -inf":
        broken[1] = float("-inf")
        broken[2] = float("-inf")
    else:
        broken[1, 5] = float(bad)
        broken[2, 9] = float(bad)
    draws = sample_rows(broken, params, [None, None, None, make_generator(3, "cpu")], [[], [4], [], []])
    assert draws.is_finite == [True, False, False, True]
    assert draws.tokens[0] == logits[0].argmax().item()
    assert draws.tokens[3] == sample(logits[3:4], [seeded], [make_generator(3, "cpu")]).item()


def test_cpu_top_equals_torch_topk_with_ties_in_index_order() -> None:
    from specdesk.engine.sampler import _top

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5000, generator=gen)
    x[1, [7, 70, 700]] = 9.0  # a three-way tie at the top
    values, indices = _top(x, 64)
    expected = x.topk(64, dim=-1).values
    assert torch.equal(values, expected)
    assert torch.equal(x.gather(1, indices), values)
    assert indices[1, :3].tolist() == [7, 70, 700]


def test_the_cpu_race_draws_only_from_its_row_and_never_a_zero() -> None:
    """The race over each row's nonzero tokens: a seeded row draws the same token alone or in any batch, and a
    token of probability 0 is never drawn even when it is most of the row."""
    probs = torch.zeros(4, 49152)
    probs[:, [5, 900, 40000]] = torch.tensor([0.2, 0.5, 0.3])
    alone = [sample_from_probs(probs[:1], [make_generator(seed, "cpu")]).item() for seed in range(200)]
    batched = [
        sample_from_probs(probs, [None, make_generator(seed, "cpu"), None, None])[1].item() for seed in range(200)
    ]
    assert alone == batched and set(alone) == {5, 900, 40000}


@pytest.mark.parametrize("spread", [6.0, 3.0, 0.3])
def test_a_plain_top_p_row_on_the_cpu_draws_what_the_full_filter_draws(spread: float) -> None:
    """sample_rows' nucleus path (a plain top-p row on the CPU) keeps filter_logits' set and, seeded, draws the
    token that softmax over filter_logits and the race draw with the same generator; a nucleus wider than the
    candidates is left to the full filter, with the same result."""
    from specdesk.engine import sampler

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(40, 49152, generator=gen) * spread
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    taken = 0
    for row in range(logits.shape[0]):
        one = logits[row : row + 1]
        tokens, finite = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool)
        nucleus = sampler._Nucleus(tokens, finite, torch.zeros(1, 0), torch.zeros(1, 0))
        took = nucleus.draw(0, one[0], params, make_generator(row, "cpu"), [])
        expected = sample_from_probs(filter_logits(one, [params]).softmax(-1), [make_generator(row, "cpu")])
        assert sample_rows(one, [params], [make_generator(row, "cpu")], [[]]).tokens == expected.tolist()
        if took:
            assert tokens.tolist() == expected.tolist() and bool(finite[0])
        taken += took
    assert taken == logits.shape[0]
    # 3.7e-5 of the mass lies 21 below the top, past every candidate span: top-p 0.99999 needs some of it.
    wide = torch.zeros(49152)
    wide[3] = 21.0
    near_one = SamplingParams(temperature=1.0, top_p=0.99999, seed=1)
    assert not nucleus.draw(0, wide, near_one, None, [])
    assert filter_logits(wide[None], [near_one]).isfinite().sum() > 1  # the full filter keeps some of them
    # Not for it: top-k, min-p, no top-p.
    for other in (SamplingParams(temperature=0.7, top_k=50), SamplingParams(temperature=0.7, top_p=0.9, min_p=0.1),
                  SamplingParams(temperature=0.7)):  # fmt: skip
        assert not nucleus.draw(0, logits[0], other, None, [])


@pytest.mark.parametrize("spread", [6.0, 3.0, 0.3])
def test_a_top_p_tree_row_on_the_cpu_judges_its_children_as_the_full_filter(spread: float) -> None:
    """A tree row's nucleus path (children to judge): each child's probability is softmax over filter_logits' set
    (0 outside it), the uniforms are torch's global draws, and the residual token is what the race draws from
    `without_tokens` with the same generator; children holding all of the kept mass leave the kept set."""
    from specdesk.engine import sampler

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(30, 49152, generator=gen) * spread
    params = SamplingParams(temperature=0.7, top_p=0.9)
    for row in range(logits.shape[0]):
        one = logits[row : row + 1]
        probs = filter_logits(one, [params]).softmax(-1)
        top3 = probs[0].topk(3).indices.tolist()
        children = [top3[1], int(probs[0].argmin()), top3[0]]  # in the nucleus, outside it, the top token
        tokens, finite = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool)
        child_probs, uniforms = torch.zeros(1, 4), torch.zeros(1, 4)
        torch.manual_seed(row)
        took = sampler._Nucleus(tokens, finite, child_probs, uniforms).draw(
            0, one[0], params, make_generator(row, "cpu"), children
        )
        assert took and bool(finite[0])
        expected_probs = probs[0, children]
        assert torch.allclose(child_probs[0, :3], expected_probs, rtol=1e-5, atol=1e-7), row
        assert child_probs[0, 1] == 0 and child_probs[0, 3] == 0
        torch.manual_seed(row)
        assert torch.equal(uniforms[0, :3], torch.rand(3)) and uniforms[0, 3] == 0
        residual = without_tokens(probs, torch.tensor([children]))
        assert tokens.tolist() == sample_from_probs(residual, [make_generator(row, "cpu")]).tolist(), row
        if set(probs[0].nonzero().flatten().tolist()) - set(children):  # the kept set holds more than the children
            assert tokens[0] not in children
    # One token holds the whole nucleus and is the only child: the residual is the kept set itself.
    peaked = torch.zeros(49152)
    peaked[42] = 50.0
    tokens, finite = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool)
    child_probs = torch.zeros(1, 1)
    assert sampler._Nucleus(tokens, finite, child_probs, torch.zeros(1, 1)).draw(0, peaked, params, None, [42])
    assert child_probs.tolist() == [[1.0]] and tokens.tolist() == [42]


def test_the_nucleus_path_flags_a_broken_row() -> None:
    logits = torch.randn(2, 49152) * 5
    logits[1, 7] = float("nan")
    params = SamplingParams(temperature=0.7, top_p=0.9)
    draws = sample_rows(logits, [params, params], [None, None], [[], []])
    assert draws.is_finite == [True, False]


def test_greedy_rows_on_the_cpu_draw_what_the_general_path_draws() -> None:
    """An all-greedy call takes numpy's path: the same tokens (the first maximum, a NaN counting as the
    maximum), finiteness flags and zero child entries as a call that also holds a sampled row."""
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    logits[1, [10, 20]] = 9.0  # a tie: the first index wins
    logits[2, 5] = float("nan")
    logits[3, 7] = float("inf")
    logits[4] = float("-inf")
    children = [[1, 2], [], [3], [], [], [4, 5, 6]]
    fast = sample_rows(logits, [GREEDY] * 6, [None] * 6, children)
    mixed = sample_rows(torch.cat([logits, torch.randn(1, 300)]), [GREEDY] * 6 + [SamplingParams(temperature=1.0)],
                        [None] * 7, [*children, []])  # fmt: skip
    assert fast.tokens == mixed.tokens[:6] and fast.tokens[1] == 10 and fast.tokens[2] == 5
    assert fast.is_finite == mixed.is_finite[:6] == [True, True, False, False, False, True]
    assert fast.child_probs == mixed.child_probs[:6] and fast.uniforms == mixed.uniforms[:6]
    assert fast.child_probs[0] == [0.0, 0.0] and fast.child_probs[1] == []
