"""The MLP speculator on the CPU int8 path: `draft_vocab.pack_for_cpu(spec, int8=True)` and `Int8NodeRanker`,
which must rank exactly the nodes `propose_nodes` ranks on the same packed speculator, and an int8 engine
proposing with it stays lossless."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.config import EngineConfig, SpecConfig
from specdesk.engine.models.int8_linear import Int8Linear
from specdesk.engine.speculators import draft_vocab
from specdesk.engine.speculators.candidates import Int8NodeRanker, node_paths, propose_nodes, rank_nodes
from specdesk.engine.speculators.draft_vocab import Int8LinearKeepingWeight, pack_for_cpu
from specdesk.engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig, SpeculatorNorm
from specdesk.engine.speculators.tree_kind import NodeTree
from specdesk.kernels import cpu_int8
from tests.tiny_models import make_tiny_model, make_tiny_speculator

V, E = 200, 64  # vocabulary and hidden size: the kernel takes inputs in groups of 32, outputs in blocks of 16
DRAFT = torch.arange(3, 3 + 48) * 3  # a 48-token draft vocabulary (3 blocks of 16)

pytestmark = pytest.mark.usefixtures("restore_threads")


class TinyBase(nn.Module):
    """What `base_weights` reads from an engine model: model.embed_tokens and an untied lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(V, E)
        self.lm_head = nn.Linear(E, V, bias=False)


def _speculator(seed: int, **config: Any) -> MLPSpeculator:
    torch.manual_seed(seed)
    spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, **{"n_predict": 3, **config}))
    if spec.config.tie_to_base:
        spec.tie_to_base(TinyBase())
    with torch.no_grad():  # norms away from their init, so every head's scale and bias matter
        for ln in spec.ln:
            assert isinstance(ln, SpeculatorNorm) and ln.weight is not None and ln.bias is not None
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_(0, 0.1)
    spec.restrict_vocab(DRAFT)
    return spec.eval()


def _count_linear_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the row count of every `cpu_int8.linear` call, appended to the returned list."""
    rows: list[int] = []
    linear = cpu_int8.linear

    def counted(x: torch.Tensor, w: cpu_int8.Int8Weight, *args: Any) -> torch.Tensor:
        rows.append(len(x))
        return linear(x, w, *args)

    monkeypatch.setattr(cpu_int8, "linear", counted)
    return rows


@torch.no_grad()
def test_pack_for_cpu_int8_swaps_projections_and_draft_heads() -> None:
    """int8 packs every projection and draft head as a W8A8 linear (float32 in and out, the float weight kept
    for the ranker), with logits at int8 precision; a shape the kernel cannot take falls back to bf16 (or
    nothing), never fails."""
    spec = _speculator(0, tie_to_base=True)
    z, toks = torch.randn(5, E), DRAFT[torch.randint(0, len(DRAFT), (5,))]
    expected = [spec.logits(i, spec.step(i, z, toks)) for i in range(3)]
    assert pack_for_cpu(spec, int8=True)
    assert all(isinstance(m, Int8LinearKeepingWeight) for m in [*spec.proj, *spec.packed_heads])
    assert Int8NodeRanker.fits(spec)
    for i in range(3):
        got = spec.logits(i, spec.step(i, z, toks))
        assert got.dtype == torch.float32 and got.shape == (5, len(DRAFT))
        torch.testing.assert_close(got, expected[i], atol=0.05, rtol=0.05)  # int8 weights and activations
    odd = _speculator(0, tie_to_base=True)
    odd.restrict_vocab(DRAFT[:40])  # 40 rows: not whole 16-channel blocks
    packed = pack_for_cpu(odd, int8=True)
    assert not Int8NodeRanker.fits(odd)
    assert not any(isinstance(m, Int8Linear) for m in [*odd.proj, *odd.packed_heads])
    assert packed == bool(odd.packed_heads)  # bf16 where oneDNN has it


@torch.no_grad()
def test_fused_int8_weights_give_the_bits_of_separate_ones() -> None:
    """What the ranker relies on: head i's draft head and head i + 1's projection quantized as one weight give,
    for every row, exactly the outputs of the two weights apart."""
    spec = _speculator(1, tie_to_base=True)
    pack_for_cpu(spec, int8=True)
    ranker = Int8NodeRanker(spec, 12)
    state = torch.randn(7, E)
    for i in range(2):
        fused = cpu_int8.linear(state, ranker.fused[i])
        assert torch.equal(fused, torch.cat([spec.packed_heads[i](state), spec.proj[i + 1](state)], dim=1))


@pytest.mark.parametrize(
    "config",
    [
        {"tie_to_base": True},
        {"tie_to_base": True, "n_predict": 4, "scale_input": True},
        {},  # own embeddings and heads, restricted to the draft vocabulary
        {"tie_weights": True},
    ],
    ids=["tied-to-base", "4-heads-scaled-input", "own-heads", "tied-weights"],
)
@torch.no_grad()
def test_int8_ranker_ranks_exactly_the_nodes_propose_nodes_ranks(config: dict[str, Any]) -> None:
    """Every pool size, batch size, number of heads and per-sequence depth limit: the same node paths, in the
    same order, as the generic ranking on the same int8-packed speculator."""
    spec = _speculator(2, **config)
    assert pack_for_cpu(spec, int8=True) and Int8NodeRanker.fits(spec)
    n = spec.n_predict
    hidden, last = torch.randn(3, E) * 2, torch.randint(0, V, (3,))
    for num_nodes in (1, 4, 12, 64):
        ranker = Int8NodeRanker(spec, num_nodes)
        for b in (1, 2, 3):
            for heads in range(1, n + 1):
                for depths in ([heads] * b, [max(1, heads - j) for j in range(b)]):
                    got = ranker(hidden[:b], last[:b], heads, depths)
                    want = propose_nodes(spec, hidden[:b], last[:b], num_nodes, num_heads=heads, max_depth=depths)
                    assert got == want, (num_nodes, b, heads, depths)
                    for row, depth in zip(got, depths, strict=True):  # a tree within the depth, best first
                        assert 0 < len(row) <= num_nodes and max(map(len, row)) <= depth
                        assert all(p[:j] in row for p in row for j in range(1, len(p)))
    # The ranking is the speculator's: its best node is the first head's most likely token.
    logp = F.log_softmax(spec.logits(0, spec.step(0, spec.scale(hidden[:1]), last[:1])), -1)
    assert Int8NodeRanker(spec, 4)(hidden[:1], last[:1], n, [n])[0][0] == [int(DRAFT[logp.argmax()])]


@torch.no_grad()
@pytest.mark.parametrize("confident", [False, True])
def test_int8_ranker_asked_for_fewer_nodes_gives_the_top_of_its_pool(confident: bool) -> None:
    """The decoder's steps between measurements rank only the nodes they verify: the same nodes, in the same
    order, as the top of the whole pool's ranking, for every smaller width, batch and depth limit."""
    spec = _speculator(3, tie_to_base=True)
    if confident:
        for h in spec.draft_heads:
            h.mul_(12)  # peaked heads: deep chains among the top nodes
    pack_for_cpu(spec, int8=True)
    ranker = Int8NodeRanker(spec, 12)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        hidden, last = torch.randn(2, E, generator=g) * 2, torch.randint(0, V, (2,), generator=g)
        for depths in ([3, 3], [3, 1]):
            pool = ranker(hidden, last, 3, depths)
            for m in range(1, 12):
                assert ranker(hidden, last, 3, depths, num_nodes=m) == [row[:m] for row in pool], (m, depths)


@torch.no_grad()
@pytest.mark.parametrize("confident", [False, True])
def test_int8_ranker_expands_only_parents_that_can_have_a_child_in_the_tree(
    monkeypatch: pytest.MonkeyPatch, confident: bool
) -> None:
    """Pruning, at width 4: the fourth-best first token (3 nodes ahead of it) is never expanded, the third head
    runs only on parents with at most 2 nodes ahead of them, and not at all where there are none (flat heads:
    the best second-level node trails three first tokens). What is left ranks as `propose_nodes` ranks."""
    spec = _speculator(4, tie_to_base=True)
    if confident:
        for h in spec.draft_heads:
            h.mul_(12)  # peaked heads, as a trained speculator's often are: chains worth a third head
    pack_for_cpu(spec, int8=True)
    ranker = Int8NodeRanker(spec, 4)
    rows = _count_linear_rows(monkeypatch)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        hidden, last = torch.randn(1, E, generator=g) * 3, torch.randint(0, V, (1,), generator=g)
        rows.clear()
        ranked = ranker(hidden, last, 3, [3])
        calls = list(rows)  # the first projection's, then one per head that ran
        assert ranked == propose_nodes(spec, hidden, last, 4, num_heads=3, max_depth=[3])
        assert calls[1:3] == [1, 3]  # head 1: the three best first tokens, not the beam's 4
        if confident:
            assert len(calls) == 4 and calls[3] <= 2 and max(map(len, ranked[0])) == 3
        else:
            assert len(calls) == 3 and max(map(len, ranked[0])) <= 2


@torch.no_grad()
def test_int8_ranker_with_a_floor_leaves_out_exactly_the_nodes_below_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """min_logp: the pool's ranking less the nodes whose path log-probability is below the floor (the same
    nodes in the same order, whatever the width), and a floor no first token reaches runs the first head alone."""
    spec = _speculator(5, tie_to_base=True)
    for h in spec.draft_heads:
        h.mul_(12)  # peaked heads: first tokens above and below the floors
    pack_for_cpu(spec, int8=True)
    ranker = Int8NodeRanker(spec, 12)
    g = torch.Generator().manual_seed(2)
    kept = total = 0
    for _ in range(10):
        hidden, last = torch.randn(2, E, generator=g) * 2, torch.randint(0, V, (2,), generator=g)
        paths, scores = rank_nodes(spec, hidden, last, 12, num_heads=3, max_depth=torch.tensor([3, 2]))
        for floor in (0.05, 0.2, 0.5):
            # node_paths drops a row's -inf nodes, which rank last: zip pairs the rest with their scores
            sure = [[p for p, s in zip(row, sc, strict=False) if s >= math.log(floor)]
                    for row, sc in zip(node_paths(paths, scores), scores.tolist(), strict=True)]  # fmt: skip
            for m in (2, 12):
                got = ranker(hidden, last, 3, [3, 2], num_nodes=m, min_logp=math.log(floor))
                assert got == [row[:m] for row in sure], (floor, m)
            kept += sum(map(len, sure))
            total += sum(map(len, node_paths(paths, scores)))
    assert 0 < kept < total  # the floors left some nodes in and some out
    flat = _speculator(6, tie_to_base=True)  # unpeaked: no first token near a probability of one half
    pack_for_cpu(flat, int8=True)
    assert rank_nodes(flat, hidden[:1], last[:1], 1)[1].item() < math.log(0.5)
    rows = _count_linear_rows(monkeypatch)
    assert Int8NodeRanker(flat, 12)(hidden[:1], last[:1], 3, [3], min_logp=math.log(0.5)) == [[]]
    assert len(rows) == 2  # the first projection and the first head: nothing to expand


def test_node_tree_uses_the_int8_ranker_only_where_it_fits() -> None:
    config = SpecConfig(mlp_dir="unused", use_ngram=False, node_pool_size=12)
    spec = _speculator(3, tie_to_base=True)
    assert NodeTree(spec, config, torch.device("cpu")).int8 is None  # float32 heads
    pack_for_cpu(spec, int8=True)
    tree = NodeTree(spec, config, torch.device("cpu"))
    assert tree.int8 is not None
    hidden, last = torch.randn(2, E), torch.tensor([4, 9])
    assert tree.rank(hidden, last, 3, [3, 2]) == propose_nodes(spec, hidden, last, 12, num_heads=3, max_depth=[3, 2])


def test_int8_engine_proposing_through_the_ranker_is_lossless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An int8 engine whose MLP speculator has a draft vocabulary proposes through the ranker, and greedy and
    seeded output equal plain int8 decoding token for token."""
    model_dir = make_tiny_model("mistral", tmp_path)  # hidden 64, vocabulary 400
    mlp_dir = make_tiny_speculator(model_dir, tmp_path / "speculator")
    (mlp_dir / draft_vocab.FILE_NAME).write_text(json.dumps({"token_ids": list(range(0, 400, 5))}))  # 80 tokens
    calls: list[int] = []
    ranker_call = Int8NodeRanker.__call__

    def spy(self: Int8NodeRanker, *args: Any) -> list[list[list[int]]]:
        calls.append(len(args[0]))
        return ranker_call(self, *args)

    monkeypatch.setattr(Int8NodeRanker, "__call__", spy)
    prompts: list[str | list[int]] = ["Your order ships today. Your order", [5, 17, 42, 8, 99]]
    params = [SamplingParams(max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)]  # fmt: skip
    outs = {}
    for name, speculator in (("plain", None), ("mlp", str(mlp_dir))):
        llm = LLM(model=str(model_dir), dtype="bfloat16", device="cpu", quantization="int8", speculator=speculator,
                  spec_max_batch_size=16, spec_tree_width=4)  # fmt: skip
        try:
            outs[name] = [o.token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
    assert calls, "the int8 engine did not propose through Int8NodeRanker"
    assert outs["mlp"] == outs["plain"]


def test_an_unsure_speculator_verifies_no_node_and_decoding_stays_exact(tmp_path: Path) -> None:
    """spec_confident_nodes (the default for an MLP drafting alone): a random speculator's nodes are far less likely
    than a verified token costs, so the int8 engine ranks them and verifies none; without it the chosen width's
    nodes are verified. Either way the output is plain decoding's."""
    model_dir = make_tiny_model("mistral", tmp_path)
    mlp_dir = make_tiny_speculator(model_dir, tmp_path / "speculator")
    (mlp_dir / draft_vocab.FILE_NAME).write_text(json.dumps({"token_ids": list(range(0, 400, 5))}))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs, nodes = {}, {}
    for name, speculator, confident in (("plain", None, True), ("sure", str(mlp_dir), True),
                                        ("all", str(mlp_dir), False)):  # fmt: skip
        llm = LLM(model=str(model_dir), dtype="bfloat16", device="cpu", quantization="int8", speculator=speculator,
                  spec_confident_nodes=confident)  # fmt: skip
        try:
            outs[name] = llm.generate([[5, 17, 42, 8, 99]], params)[0].token_ids
            nodes[name] = llm.stats().spec_num_tree_nodes
        finally:
            llm.shutdown()
    assert outs["sure"] == outs["plain"] == outs["all"]
    assert nodes["sure"] == 0 < nodes["all"]
    # By default the floor is on where the MLP drafts alone, off beside the n-gram (the measured choice).
    for speculator, confident in ((str(mlp_dir), True), (f"{mlp_dir}+ngram", False)):
        config = EngineConfig(model=str(model_dir), speculator=speculator)
        resolved = SpecConfig.resolve(config, "cpu")
        assert resolved is not None and resolved.confident_nodes is confident
