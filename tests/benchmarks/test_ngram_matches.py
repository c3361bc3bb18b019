"""benchmarks.ngram_matches: n-gram drafts classed by how far back their match reaches, on a real (tiny) engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.ngram_matches import match_class, trace
from specdesk.engine import LLM, SamplingParams
from specdesk.engine.speculators.ngram import NgramSpeculator
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("restore_threads")


def test_a_draft_is_classed_by_its_source_and_reach() -> None:
    ng = NgramSpeculator(max_n=4, min_n=2)
    passage = list(range(100, 120))
    seq = [7, *passage, 1, 2, 3, 9, *passage]  # the last 20 tokens occurred before, after a different token
    assert ng.propose("a", seq, 3) == [1, 2, 3] and match_class(ng, "a", [1, 2, 3]) == "own 16+"
    seq = [5, 1, 2, 3, 4, 6, 1, 2]  # [1, 2] matches 2 back, no further
    assert ng.propose("b", seq, 2) == [3, 4] and match_class(ng, "b", [3, 4]) == "own 2+"
    seq = [8, 1, 2, 3, 1, 2, 3]  # a loop of 3, followed around
    assert ng.propose("c", seq, 5) == [1, 2, 3, 1, 2] and match_class(ng, "c", [1, 2, 3, 1, 2]) == "own 3+"
    assert match_class(ng, "b", [40, 41]) == "elsewhere"  # not what the sequence's own match continues with


def _trace(model: Path, penalty: float = 1.0, **settings: int) -> dict[str, dict[str, float]]:
    """The drafts' table of `trace` (its steps' table checked in the test below)."""
    return _both(model, penalty, **settings)["drafts"]


def _both(model: Path, penalty: float = 1.0, **settings: int) -> dict[str, dict[str, dict[str, float]]]:
    llm = LLM(model=str(model), dtype="float32", speculator="ngram", spec_max_batch_size=4, **settings)
    try:
        repetitive = [5, 6, 7, 8, 9, 10, 11, 12] * 6  # a passage of 8, six times: matches reach far back
        params = SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=penalty)
        table = trace(llm, [repetitive, repetitive[:-3]], params)
        spec = llm.engine.speculation
        assert spec is not None and spec.ngram is not None
        # The engine's own methods again: nothing left wrapped.
        assert "propose" not in vars(spec.ngram) and "_record" not in vars(spec) and "propose" not in vars(spec)
        assert "step" not in vars(llm.engine)
    finally:
        llm.shutdown()
    return table


def test_trace_counts_what_was_accepted_of_each_verified_draft(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path)
    table = _trace(model)
    assert table and sum(r["drafts"] for r in table.values()) > 0
    for r in table.values():
        assert 0.0 <= r["mean_accepted"] <= r["mean_length"] <= r["longest"]
        assert 0.0 <= r["accepted_whole"] <= 1.0
    # The CPU's default: a match reaching 16 tokens back drafts up to 12 (ordinary ones at most 4).
    assert table["own 16+"]["longest"] == 12
    assert all(r["longest"] <= 4 for cls, r in table.items() if cls != "own 16+")
    # Under a repetition penalty every draft keeps the request's depth (at most 4); a setting caps them all.
    assert max(r["longest"] for r in _trace(model, penalty=1.1).values()) <= 4
    assert max(r["longest"] for r in _trace(model, spec_max_ngram_tokens=2).values()) <= 2


def test_trace_classes_every_decode_step_by_what_it_verified(tmp_path: Path) -> None:
    """Every decode step (not the prompts' prefill) lands in one class; an n-gram-only engine's nodes are all its
    n-gram drafts', so the MLP adds nothing and never proposes."""
    model = make_tiny_model("llama", tmp_path)
    table = _both(model)
    steps, drafts = table["steps"], table["drafts"]
    # Two replies of 24 tokens: the first of each from its prefill, the rest from decode steps (the last step's
    # verification may accept past the reply's end, which is cut).
    emitted = sum(r["steps"] * r["tokens"] for r in steps.values())
    assert 2 * 23 <= emitted < 2 * 23 + 2 * 12
    assert sum(r["share_of_time"] for r in steps.values()) == pytest.approx(1.0)
    for cls, r in steps.items():
        assert r["mlp_tokens"] == 0 and r["mlp_proposed"] == 0 and r["ms_per_step"] > 0
        if cls != "no draft":
            assert r["steps"] == drafts[cls]["drafts"] and r["nodes"] == pytest.approx(drafts[cls]["mean_length"])
            assert r["tokens"] == pytest.approx(1 + drafts[cls]["mean_accepted"])
        else:
            assert r["nodes"] == 0 and r["tokens"] == 1
