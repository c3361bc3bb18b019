"""The repetition penalty on a `draft_penalty` speculator's own logits (draft_penalty.py): the engine's rule,
over the sequence's tokens and the draft path above each head, the same in every ranking, and lossless."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.logits_processors import penalize, process_rows
from specdesk.engine.speculators import draft_vocab
from specdesk.engine.speculators.candidates import Int8NodeRanker, propose, propose_nodes
from specdesk.engine.speculators.draft_penalty import DraftPenalty, column_map
from specdesk.engine.speculators.draft_vocab import pack_for_cpu
from specdesk.engine.speculators.mlp import MLPSpeculator, MLPSpeculatorConfig
from tests.engine.test_spec_int8_ranker import DRAFT, E, TinyBase, V
from tests.tiny_models import make_tiny_model, make_tiny_speculator

pytestmark = pytest.mark.usefixtures("restore_threads")


def test_penalize_is_the_engines_repetition_penalty() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 30) * 5  # both signs
    history = [3, 7, 7, 12, 29]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.4)
    want = process_rows(logits, params, history, len(history), [[]], None)
    seen = torch.zeros(1, 30, dtype=torch.bool)
    seen[0, history] = True
    torch.testing.assert_close(penalize(logits, seen, 1.4), want)


def test_seen_columns_cover_the_sequence_and_the_draft_path_within_the_draft_vocabulary() -> None:
    columns = column_map(20, torch.tensor([2, 5, 9, 11]), torch.device("cpu"))  # four draft columns
    assert columns.tolist()[:12] == [-100, -100, 0, -100, -100, 1, -100, -100, -100, 2, -100, 3]
    penalty = DraftPenalty.of([[2, 3, 9], [5, 11], [2, 5]], [1.5, 1.2, 1.0], columns)
    assert penalty is not None
    assert penalty.seen.tolist() == [[True, False, True, False], [False, True, False, True], [False] * 4]
    logits = torch.tensor([[2.0, -2.0, 3.0, 4.0]] * 3)
    rows = torch.tensor([0, 1, 2])
    got = penalty.apply(logits, rows, torch.tensor([[-100], [0], [1]]))  # row 1's path drafted column 0
    want = [[2 / 1.5, -2.0, 3 / 1.5, 4.0], [2 / 1.2, -2.4, 3.0, 4 / 1.2], [2.0, -2.0, 3.0, 4.0]]
    torch.testing.assert_close(got, torch.tensor(want))
    assert DraftPenalty.of([[2, 3]], [1.0], columns) is None  # nobody penalized: nothing to apply
    # A token past the speculator's vocabulary (a larger tokenizer's) can't be drafted: skipped, not an error.
    wide = DraftPenalty.of([[2, 25, 9]], [1.5], columns)
    assert wide is not None and wide.seen.tolist() == [[True, False, True, False]]


def _penalized_speculator(seed: int) -> MLPSpeculator:
    torch.manual_seed(seed)
    config = MLPSpeculatorConfig(vocab_size=V, emb_dim=E, n_predict=3, tie_to_base=True, draft_penalty=True)
    spec = MLPSpeculator(config)
    spec.tie_to_base(TinyBase())
    spec.restrict_vocab(DRAFT)
    with torch.no_grad():
        for h in spec.draft_heads:
            h.mul_(8)  # peaked heads: a penalty of 1.5 moves rankings, not only scores
    return spec.eval()


@torch.no_grad()
def test_every_ranking_applies_the_penalty_over_sequence_and_path() -> None:
    """propose_nodes with a penalty ranks as if each head's logits were penalized over the sequence's tokens
    plus its own path (checked by hand on the best chain); the int8 ranker ranks exactly those nodes; and the
    penalty changes what is proposed (a seen token drops)."""
    spec = _penalized_speculator(5)
    hidden, last = torch.randn(2, E) * 3, torch.tensor([int(DRAFT[0]), 7])
    plain = propose_nodes(spec, hidden, last, 8)
    seen_best = [plain[0][0][0], plain[1][0][0]]  # each sequence has already used its best first token
    penalty = DraftPenalty.of([[int(last[0]), seen_best[0]], [int(last[1]), seen_best[1]]], [1.5, 1.5], spec.columns())
    assert penalty is not None
    ranked = propose_nodes(spec, hidden, last, 8, penalty=penalty)
    assert [r[0][0] for r in ranked] != seen_best
    # By hand for sequence 0: greedy heads, each penalized over history + path, give IBM's chain (top_k 1).
    state, prev, seen, chain = spec.scale(hidden[:1]), last[:1], penalty.seen[0].clone(), []
    for i in range(3):
        state = spec.step(i, state, prev)
        col = int(penalize(spec.logits(i, state), seen[None], 1.5).argmax())
        chain.append(int(DRAFT[col]))
        seen[col], prev = True, DRAFT[col : col + 1]
    assert propose(spec, hidden[:1], last[:1], [1, 1, 1], 1, penalty=penalty)[0][0, 0].tolist() == chain
    # The CPU int8 path: the same nodes as propose_nodes on the same packed speculator, penalty or not.
    pack_for_cpu(spec, int8=True)
    for num_nodes in (4, 12):
        ranker = Int8NodeRanker(spec, num_nodes)
        for depths in ([3, 3], [2, 3]):
            want = propose_nodes(spec, hidden, last, num_nodes, max_depth=depths, penalty=penalty)
            assert ranker(hidden, last, 3, depths, penalty) == want
            assert ranker(hidden, last, 3, depths) == propose_nodes(spec, hidden, last, num_nodes, max_depth=depths)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_draft_penalty_speculator_is_lossless_and_ranks_under_each_requests_penalty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantization: str | None
) -> None:
    """Greedy and seeded output under a repetition penalty equal plain decoding token for token, and the
    decoder handed the ranking each request's penalty over its tokens so far."""
    model_dir = make_tiny_model("llama", tmp_path)
    mlp_dir = make_tiny_speculator(model_dir, tmp_path / "speculator", draft_penalty=True)
    (mlp_dir / draft_vocab.FILE_NAME).write_text(json.dumps({"token_ids": list(range(0, 320, 4))}))  # 80 tokens
    given: list[DraftPenalty | None] = []
    apply = DraftPenalty.apply

    def spy(self: DraftPenalty, *args: Any) -> torch.Tensor:
        given.append(self)
        return apply(self, *args)

    monkeypatch.setattr(DraftPenalty, "apply", spy)
    prompts: list[str | list[int]] = ["Your order ships today. Your order", [5, 17, 42, 8, 99]]
    params = [
        SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True, repetition_penalty=1.1),
    ]
    outs = {}
    for name, speculator in (("plain", None), ("mlp", str(mlp_dir))):
        dtype = "float32" if quantization is None else "bfloat16"
        llm = LLM(model=str(model_dir), dtype=dtype, device="cpu", quantization=quantization, speculator=speculator,
                  spec_max_batch_size=16, spec_tree_width=4)  # fmt: skip
        try:
            outs[name] = [o.token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
    assert outs["mlp"] == outs["plain"]
    assert given and all(p is not None for p in given)
    assert {round(float(x), 3) for p in given for x in p.penalty if p is not None} <= {1.3, 1.1}
    assert any(bool(p.seen.any()) for p in given if p is not None)


def test_the_flag_round_trips_through_the_published_config(tmp_path: Path) -> None:
    base = TinyBase()
    for flag in (True, False):
        spec = MLPSpeculator(MLPSpeculatorConfig(vocab_size=V, emb_dim=E, tie_to_base=True, draft_penalty=flag))
        spec.tie_to_base(base)
        spec.save_pretrained(tmp_path / str(flag))
        assert json.loads((tmp_path / str(flag) / "config.json").read_text()).get("draft_penalty", False) is flag
        assert MLPSpeculator.from_pretrained(tmp_path / str(flag), base_model=base).config.draft_penalty is flag
