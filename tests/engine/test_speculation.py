"""Speculation inside the engine: lossless (greedy and seeded), shares pages, hashes only verified tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.config import EngineConfig
from specdesk.engine.llm_engine import LLMEngine
from specdesk.engine.models.loader import load_model
from specdesk.engine.speculators import draft_vocab
from specdesk.engine.speculators.candidates import beam_top_k, propose
from specdesk.engine.speculators.mlp import MLPSpeculator
from specdesk.training import draft_vocab as vocab_builder
from tests.tiny_models import make_tiny_model, make_tiny_speculator

REPETITIVE = "Your order 48213 ships today. Your order 48213 ships today. Your order 48213 ships"
PROMPTS: list[str | list[int]] = [
    REPETITIVE,
    "Hello, thank you for contacting customer care.",
    "My order",
    [5, 17, 42, 8, 99],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="module")
def mlp_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight MLP speculator in the published format: wrong guesses must never change output."""
    out = make_tiny_speculator(model_dir, tmp_path_factory.mktemp("mlp") / "speculator")
    return out


def outputs(model_dir: Path, speculator: str | None, params: SamplingParams, **kw: object) -> list[list[int]]:
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator=speculator, spec_max_batch_size=16, **kw)
    try:
        outs = llm.generate(PROMPTS, params)
        if speculator is not None:
            stats = llm.stats()
            assert stats.spec_num_drafts > 0, "speculation never ran"
        return [o.token_ids for o in outs]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def mlp_small_vocab_dir(mlp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same speculator with a draft vocabulary of a third of the tokens."""
    out = tmp_path_factory.mktemp("mlp-vocab") / "speculator"
    shutil.copytree(mlp_dir, out)
    vocab_builder.save(out, list(range(0, 360, 3)))
    return out


def test_a_fixed_width_beyond_n_candidates_widens_the_beam(model_dir: Path, mlp_dir: Path) -> None:
    assert beam_top_k([5, 4, 3], 5, 5) == [5, 4, 3] and beam_top_k([5, 4, 3], 5, 1) == [5, 4, 3]
    assert beam_top_k([5, 4, 3], 5, 64) == [10, 8, 6] and beam_top_k([5, 4, 3], 5, 128) == [15, 12, 9]
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator=str(mlp_dir), spec_tree="paths",
              spec_tree_width=40, spec_max_batch_size=16)  # fmt: skip
    try:
        llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))
        stats = llm.stats()
        # IBM's 5 paths of 3 tokens give at most 15 nodes; 40 paths from a [10, 8, 6] beam give far more.
        assert stats.spec_num_tree_nodes / stats.spec_num_drafts > 15
    finally:
        llm.shutdown()
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator=str(mlp_dir), spec_tree="nodes",
              spec_tree_width=40, spec_max_batch_size=16)  # fmt: skip
    try:
        llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))
        stats = llm.stats()
        # 40 nodes are 40 nodes at most (fewer for a request whose adaptive depth is shorter).
        assert 15 < stats.spec_num_tree_nodes / stats.spec_num_drafts <= 40
    finally:
        llm.shutdown()


def test_restricted_draft_vocabulary_proposes_only_its_tokens(mlp_small_vocab_dir: Path, model_dir: Path) -> None:
    base = load_model(str(model_dir), "float32", "cpu")
    spec = MLPSpeculator.from_pretrained(mlp_small_vocab_dir)
    vocab = draft_vocab.load(mlp_small_vocab_dir)
    assert vocab is not None
    spec.restrict_vocab(vocab)
    tokens, _ = propose(spec, torch.randn(2, base.hidden_size), torch.tensor([5, 9]))
    assert set(tokens.flatten().tolist()) <= set(vocab.tolist())


@pytest.mark.parametrize(
    "speculator",
    ["ngram", "mlp", "mlp+ngram", "mlp-small-vocab", "mlp-nodes-1", "mlp-nodes-40", "mlp-paths-5", "mlp-paths-40"],
)
def test_greedy_output_identical_with_speculation(
    model_dir: Path, mlp_dir: Path, mlp_small_vocab_dir: Path, speculator: str
) -> None:
    name = {
        "ngram": "ngram",
        "mlp": str(mlp_dir),
        "mlp+ngram": f"{mlp_dir}+ngram",
        "mlp-small-vocab": str(mlp_small_vocab_dir),
    }.get(speculator, str(mlp_dir))
    # "mlp-<tree>-<width>": draft nodes or IBM's paths (40 paths: beyond its 5 candidates, a wider beam).
    _, tree, width = [*speculator.split("-"), "", ""][:3]
    kw = {"spec_tree": tree, "spec_tree_width": int(width)} if tree in ("nodes", "paths") else {}
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    assert outputs(model_dir, name, params, **kw) == outputs(model_dir, None, params)


def test_seeded_sampling_identical_with_speculation(model_dir: Path, mlp_dir: Path) -> None:
    params = SamplingParams(temperature=0.8, top_k=40, seed=11, max_tokens=24, ignore_eos=True)
    assert outputs(model_dir, f"{mlp_dir}+ngram", params) == outputs(model_dir, None, params)


def test_ngram_speculation_takes_several_tokens_per_step(model_dir: Path) -> None:
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator="ngram")
    try:
        # Greedy random models fall into loops quickly: exactly what n-gram lookup predicts.
        out = llm.generate([REPETITIVE], SamplingParams(max_tokens=64, ignore_eos=True))[0]
        m = out.metrics
        assert m.num_spec_steps > 0 and m.num_accepted_tokens > 0
        assert m.num_decode_steps < m.num_generated_tokens - 1
        assert m.tokens_per_step > 1.2
        assert sum(m.accepted_per_position) == m.num_accepted_tokens
    finally:
        llm.shutdown()


def test_forget_replies_empties_the_ngram_store_and_changes_only_speed(model_dir: Path) -> None:
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator="ngram")
    try:
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        first = llm.generate(["Hello, thank you"], params)[0]
        speculation = llm.engine.speculation
        assert speculation is not None and speculation.ngram is not None
        assert speculation.ngram.num_replies == 1
        warm = llm.generate(["Hello, thank you"], params)[0]  # its own reply is in the store
        llm.forget_replies()
        cold = llm.generate(["Hello, thank you"], params)[0]
        assert speculation.ngram.num_replies == 1  # cold's reply only: the first two were forgotten
        assert first.token_ids == warm.token_ids == cold.token_ids
        assert warm.metrics.num_decode_steps < cold.metrics.num_decode_steps
    finally:
        llm.shutdown()


def test_replies_are_drafted_only_within_their_tenant(model_dir: Path) -> None:
    """A tenant's (cache salt's) stored replies never draft another's requests: their speed would tell what
    the other tenant's replies said."""
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator="ngram")
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    def steps(salt: str) -> int:
        *_, last = llm.deltas(llm.submit("Hello, thank you", params, cache_salt=salt))
        assert last.metrics is not None
        return last.metrics.num_decode_steps

    try:
        cold = steps("bob")  # nothing stored for bob
        llm.forget_replies()
        steps("alice")  # alice's reply to the same prompt is stored, for alice
        assert steps("bob") == cold  # and drafts nothing for bob
        assert steps("alice") < cold  # but does for alice
    finally:
        llm.shutdown()


def test_stop_and_max_tokens_inside_an_accepted_run(model_dir: Path) -> None:
    plain = outputs(model_dir, None, SamplingParams(max_tokens=37, ignore_eos=True))
    spec = outputs(model_dir, "ngram", SamplingParams(max_tokens=37, ignore_eos=True))
    assert spec == plain and all(len(t) == 37 for t in spec)
    llm = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator="ngram")
    try:
        full = llm.generate([REPETITIVE], SamplingParams(max_tokens=40, ignore_eos=True))[0]
        stop = full.text[len(full.text) // 2 :][:3]
        cut = llm.generate([REPETITIVE], SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))[0]
        assert cut.text == full.text[: full.text.index(stop)]
        assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    finally:
        llm.shutdown()


def _engine(model_dir: Path, speculator: str, **kw: object) -> LLMEngine:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator=speculator, **kw)  # type: ignore[arg-type]
    return LLMEngine(config, load_model(config.model, "float32", "cpu"))


def test_candidates_share_pages_and_only_verified_tokens_are_hashed(model_dir: Path, mlp_dir: Path) -> None:
    engine = _engine(model_dir, str(mlp_dir), block_size=16)
    prompt = engine.tokenizer.encode(REPETITIVE * 3)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    seq = engine.sequences[rid]
    engine.step()  # prefill + first token
    assert seq.num_output_tokens == 1
    bm = engine.block_manager
    for _ in range(10):
        assert engine.speculation is not None
        engine.speculation.propose(engine.scheduler.running, bm.usage)
        nodes = len(seq.draft_token_ids)
        free_before = bm.num_free_blocks
        pages_before = len(seq.block_table)
        batch = engine.scheduler.schedule()
        # KV for the tree costs only the pages its own new tokens need: nothing per candidate.
        assert free_before - bm.num_free_blocks == bm.blocks_needed(seq.num_tokens + nodes) - pages_before
        (verdict,) = engine._run(batch)
        assert verdict.error is None
        engine.scheduler.append_tokens(batch.scheduled[0], verdict.tokens)
        # Rejected draft slots are reclaimed at once.
        assert len(seq.block_table) == bm.blocks_needed(seq.num_tokens)
    # Every published page holds verified tokens only: its hash is one of the sequence's own chain.
    chain_seq = engine.sequences[rid]
    bm._hash_full_blocks(chain_seq, chain_seq.num_computed_tokens)
    published = {b.block_hash for b in bm.blocks if b.block_hash is not None}
    assert published and published <= set(chain_seq.block_hashes)
    assert seq.metrics.num_spec_steps == 10


def test_speculation_option_errors_are_clear(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spec_tree_width"):
        EngineConfig(spec_tree_width=0)
    with pytest.raises(ValueError, match="spec_tree"):
        EngineConfig(spec_tree="beam")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="speculator"):
        LLM(model=str(model_dir), dtype="float32", device="cpu", speculator=str(tmp_path / "missing"))
