"""benchmarks.step_profile: per-phase step timings of a real (tiny) engine, plain and speculating."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from benchmarks.step_profile import acceptance_for, best_chain, by_nodes, phases_by_nodes, profile, profile_legs
from specdesk.engine import LLM, llm_engine
from specdesk.engine.llm_engine import verify_step
from tests.tiny_models import make_tiny_model


def test_profile_times_every_phase_of_a_speculating_engine(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path)
    llm = LLM(model=str(model), dtype="float32", speculator="ngram", spec_max_batch_size=4)
    llm.shutdown()
    repetitive = [5, 6, 7, 8, 9] * 6  # the n-gram speculator finds its continuations
    record: list[tuple[int, int, float]] = []
    result = profile(llm, [repetitive, repetitive[:-1]], max_tokens=24, sync=lambda: None, record=record)
    assert result["tokens per step"] > 1.0  # speculation ran and was accepted
    # One record per counted step (the warm-up's left out), its tokens the profile's, drafts among them.
    assert len(record) == result["steps"]
    assert sum(e for _, e, _ in record) == round(result["tokens per step"] * result["steps"])
    assert any(n > 0 for n, _, _ in record) and all(e <= n + 1 for n, e, _ in record)
    # The engine is left as it was: no wrapper stays behind to time (or count) a later profile twice.
    assert "forward" not in vars(llm.engine.loaded.model) and "execute" not in vars(llm.engine.runner)
    assert llm_engine.verify_step is verify_step
    for phase in ("propose drafts", "verify tree", "execute (pass + logits)", "  model layers", "  logits"):
        assert result[phase] > 0.0, phase
    # Nested phases fit inside their parent, and the phases inside the step.
    assert result["  model layers"] + result["  logits"] <= result["execute (pass + logits)"]
    assert result["execute (pass + logits)"] + result["propose drafts"] <= result["step (total)"]


def test_decode_only_leaves_each_prefill_step_out(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path)
    # Chunks of 16: the 40- and 30-token prompts prefill in 3 and 2 steps, the last emitting the first token.
    llm = LLM(model=str(model), dtype="float32", max_num_batched_tokens=16)
    llm.shutdown()
    prompts = [list(range(3, 43)), list(range(5, 35))]
    # A clock that ticks once a reading: a phase with no timed phase inside it (the model's layers) then sums
    # exactly one second per call, so the sums count passes, free of timing noise.
    ticks = itertools.count()

    def clock() -> float:
        return float(next(ticks))

    every = profile(llm, prompts, max_tokens=8, sync=lambda: None, clock=clock)
    decode = profile(llm, prompts, max_tokens=8, sync=lambda: None, decode_only=True, clock=clock)
    assert every["steps"] == (3 + 7) + (2 + 7)
    assert decode["steps"] == 2 * 7
    assert every["tokens per step"] < decode["tokens per step"] == 1.0
    # The prefill chunks' passes are out of the phase sums, not only out of the count: 14 passes against 19.
    assert decode["  model layers"] * decode["steps"] == 1e3 * 14
    assert every["  model layers"] * every["steps"] == 1e3 * 19


def test_by_nodes_groups_fits_and_bounds_a_known_record() -> None:
    # Steps cost exactly 5 + 1 * nodes ms; a plain step 4 ms. Sizes 0, 2 and 4 nodes.
    record = [(0, 1, 0.004), (2, 1, 0.007), (2, 3, 0.007), (4, 5, 0.009), (4, 2, 0.009)]
    table = by_nodes(record, plain_ms=4.0)
    assert abs(table["fit a (ms)"] - 5.0) < 1e-9 and abs(table["fit b (ms per node)"] - 1.0) < 1e-9
    sizes = {r["nodes"]: r for r in table["sizes"]}
    assert [sizes[n]["steps"] for n in (0, 2, 4)] == [1, 2, 2]
    assert sizes[4]["tokens per step"] == 3.5 and abs(sizes[4]["ms per step"] - 9.0) < 1e-9
    assert abs(sizes[4]["speed vs plain"] - 3.5 * 4 / 9) < 1e-9
    assert abs(sizes[2]["2x needs tokens per step"] - 2 * 7 / 4) < 1e-9
    tokens = 1 + 1 + 3 + 5 + 2
    assert abs(table["speed vs plain"] - tokens * 4 / (4 + 7 + 7 + 9 + 9)) < 1e-9
    # Only the accepted nodes verified: a plain step where none was, else 5 + (tokens - 1).
    assert abs(table["accepted nodes only (bound)"] - tokens * 4 / (4 + 4 + 7 + 9 + 6)) < 1e-9
    assert abs(table["accepted nodes only, drafting free (bound)"] - tokens * 4 / (4 + 4 + 6 + 8 + 5)) < 1e-9


def test_chains_by_acceptance_and_the_acceptance_2x_needs() -> None:
    # A step of k drafts costs 5 + k ms, a plain one 4: perfect drafts give (k + 1) 4 / (5 + k), 2x from k = 3.
    assert best_chain(1.0, 5.0, 1.0, 4.0)[1] == 64 and best_chain(0.0, 5.0, 1.0, 4.0) == (1.0, 0)
    speed, k = best_chain(0.8, 5.0, 1.0, 4.0)
    assert abs(speed - sum(0.8**i for i in range(k + 1)) * 4 / (5 + k)) < 1e-12
    assert all(best_chain(0.8, 5.0, 1.0, 4.0)[0] >= sum(0.8**i for i in range(j + 1)) * 4 / (5 + j) for j in range(30))
    p, k = acceptance_for(2.0, 5.0, 1.0, 4.0)  # type: ignore[misc]
    assert best_chain(p, 5.0, 1.0, 4.0)[0] >= 2.0 > best_chain(p - 2e-4, 5.0, 1.0, 4.0)[0]
    # A node at 0.21 of a plain step (the AVX2 CPU's price) needs drafts right 84.5 % of the time.
    p, k = acceptance_for(2.0, 1.0, 0.21, 1.0)  # type: ignore[misc]
    assert 0.844 < p < 0.846 and k == 5
    assert acceptance_for(2.0, 5.0, 3.0, 4.0) is None  # a node dearer than half a plain step: never 2x
    assert best_chain(0.0, 0.8, 0.05, 1.0) == (1.0, 0)  # a fit below a plain step prices a drafted one as plain
    flat = by_nodes([(0, 1, 0.004), (2, 1, 0.007), (4, 5, 0.007)], plain_ms=4.0)  # slope 0: no chains priced
    assert flat["chains by acceptance"] is None and flat["2x needs acceptance per draft"] is None
    table = by_nodes([(0, 1, 0.004), (2, 1, 0.007), (4, 5, 0.009)], plain_ms=4.0)
    assert table["chains by acceptance"][0.8] == best_chain(0.8, 5.0, 1.0, 4.0)
    assert table["2x needs acceptance per draft"] == acceptance_for(2.0, 5.0, 1.0, 4.0)


def test_by_nodes_counts_the_nodes_the_passes_verified(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path)
    llm = LLM(model=str(model), dtype="float32", speculator="ngram", spec_max_batch_size=4)
    llm.shutdown()
    assert llm.engine.speculation is not None
    repetitive = [5, 6, 7, 8, 9] * 6
    record: list[tuple[int, int, float]] = []
    # One prompt: the warm-up runs it as the measured run does (caches and stored replies reset before each),
    # so the engine's own count of verified nodes is twice the record's.
    profile(llm, [repetitive], max_tokens=24, sync=lambda: None, decode_only=True, record=record)
    assert sum(n for n, _, _ in record) > 0
    assert llm.engine.speculation.stats.num_tree_nodes == 2 * sum(n for n, _, _ in record)


def test_by_nodes_without_a_fit_and_on_steps_that_emit_nothing() -> None:
    # One drafted size only: no slope to fit, so no 2x column beyond plain steps' and no bounds.
    table = by_nodes([(0, 1, 0.004), (3, 2, 0.006), (3, 4, 0.006)], plain_ms=4.0)
    assert table["fit a (ms)"] is None and table["accepted nodes only (bound)"] is None
    assert table["chains by acceptance"] is None and table["2x needs acceptance per draft"] is None
    assert [r["2x needs tokens per step"] for r in table["sizes"]] == [2.0, None]
    assert abs(table["speed vs plain"] - 7 * 4 / 16) < 1e-9
    with pytest.raises(ValueError, match="decode steps"):
        by_nodes([(0, 0, 0.004), (2, 1, 0.006)], plain_ms=4.0)  # a prefill chunk emits nothing
    with pytest.raises(ValueError):
        by_nodes([], plain_ms=4.0)


def test_alternating_legs_take_turns_on_one_engine_and_record_only_speculation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_model("llama", tmp_path)
    llm = LLM(model=str(model), dtype="float32", speculator="ngram", spec_max_batch_size=4)
    llm.shutdown()
    order: list[bool] = []
    add_request = llm.engine.add_request

    def spy(ids: list[int], params: Any) -> Any:
        order.append(params.speculate)
        return add_request(ids, params)

    monkeypatch.setattr(llm.engine, "add_request", spy)
    repetitive = [5, 6, 7, 8, 9] * 6
    record: list[tuple[int, int, float]] = []
    legs = profile_legs(llm, [repetitive, repetitive[:-1]], max_tokens=24, sync=lambda: None, decode_only=True,
                        record=record, legs=(False, True))  # fmt: skip
    # The warm-up in both legs, then each prompt in both, the first leg alternating prompt by prompt.
    assert order == [False, True, False, True, True, False]
    assert legs[False]["tokens per step"] == 1.0 < legs[True]["tokens per step"]
    assert legs[False]["steps"] == 2 * 23  # every decode step of both prompts' 23 tokens after the first
    # Only the speculative leg's steps are recorded, each one of its counted steps.
    assert len(record) == legs[True]["steps"] and sum(e for _, e, _ in record) == 2 * 23


def test_phases_by_nodes_means_and_slopes_of_a_known_record() -> None:
    # The pass costs 4 + 2 per node ms, the proposal 1 ms wherever there are nodes; steps of 0, 1 and 3 nodes.
    steps = [(0, {"step (total)": 5.0, "  model layers": 4.0}),
             (1, {"step (total)": 8.0, "  model layers": 6.0, "propose drafts": 1.0}),
             (3, {"step (total)": 12.0, "  model layers": 10.0, "propose drafts": 1.0}),
             (3, {"step (total)": 12.0, "  model layers": 10.0, "propose drafts": 1.0})]  # fmt: skip
    table = phases_by_nodes(steps)
    assert table["phases"] == ["step (total)", "  model layers", "propose drafts"]
    assert table["steps"] == {0: 1, 1: 1, 3: 2}
    assert table["mean ms"][0] == {"step (total)": 5.0, "  model layers": 4.0, "propose drafts": 0.0}
    assert table["mean ms"][3]["  model layers"] == 10.0
    slopes = table["ms per node"]
    assert abs(slopes["  model layers"] - 2.0) < 1e-9 and abs(slopes["step (total)"] - 2.0) < 1e-9
    assert abs(slopes["propose drafts"]) < 1e-9
    # One drafted size only: no slope.
    assert phases_by_nodes(steps[:1] + steps[2:])["ms per node"]["  model layers"] is None


def test_profile_records_each_recorded_steps_phases(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path)
    llm = LLM(model=str(model), dtype="float32", speculator="ngram", spec_max_batch_size=4)
    llm.shutdown()
    repetitive = [5, 6, 7, 8, 9] * 6
    record: list[tuple[int, int, float]] = []
    phases: list[tuple[int, dict[str, float]]] = []
    profile_legs(llm, [repetitive], max_tokens=24, sync=lambda: None, decode_only=True, record=record,
                 legs=(False, True), phases=phases)  # fmt: skip
    # One entry per recorded step (the warm-up's and the plain leg's left out), the same nodes and seconds.
    assert [n for n, _ in phases] == [n for n, _, _ in record]
    assert all(abs(ms["step (total)"] - 1e3 * s) < 1e-9 for (_, ms), (_, _, s) in zip(phases, record, strict=True))
    # A step's phases fit inside it, and a step that verified nodes ran its pass.
    for n, ms in phases:
        assert ms["execute (pass + logits)"] + ms.get("propose drafts", 0.0) <= ms["step (total)"] + 1e-9
        assert n == 0 or ms["  model layers"] > 0.0
