"""One request never fails another: a sampling or verification failure for one request of a speculating
batch finishes that request alone, with an error; the others finish with exactly their own tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from specdesk.engine import FinishReason, SamplingParams, StreamDelta
from specdesk.engine.config import EngineConfig
from specdesk.engine.llm_engine import LLMEngine
from specdesk.engine.model_runner import ForwardOutput
from specdesk.engine.models.loader import load_model
from specdesk.engine.scheduler import ScheduledSeq
from specdesk.engine.speculators import verifier
from specdesk.engine.speculators.tree import DraftTree
from tests.tiny_models import make_tiny_model, make_tiny_speculator

PROMPTS = [
    "Your order 48213 ships today. Your order 48213 ships today. Your order",
    "Hello, thank you for contacting customer care.",
    "My order",
]
VICTIM = 1  # the prompt whose request is made to fail
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=24, ignore_eos=True)
UNSEEDED = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("isolation"))


@pytest.fixture(scope="module")
def speculator(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = make_tiny_speculator(model_dir, tmp_path_factory.mktemp("mlp") / "speculator")
    return f"{out}+ngram"


def _engine(model_dir: Path, speculator: str | None) -> LLMEngine:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator=speculator,
                          spec_max_batch_size=16)  # fmt: skip
    return LLMEngine(config, load_model(config.model, "float32", "cpu"))


def _run(engine: LLMEngine, params: list[SamplingParams]) -> list[tuple[list[int], StreamDelta]]:
    """Every prompt at once; per prompt, the streamed tokens and the final delta."""
    ids = [engine.add_request(engine.tokenizer.encode(p), sp) for p, sp in zip(PROMPTS, params, strict=True)]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    final: dict[str, StreamDelta] = {}
    while engine.has_work:
        for delta in engine.step():
            tokens[delta.request_id] += delta.token_ids
            if delta.finished:
                final[delta.request_id] = delta
    return [(tokens[rid], final[rid]) for rid in ids]


def _current_batch(engine: LLMEngine) -> list[str]:
    """Records the request ids of the pass in flight (the batch order of verify_step's jobs)."""
    current: list[str] = []
    real = engine.runner.execute

    def execute(batch: list[ScheduledSeq], trees: list[DraftTree | None]) -> ForwardOutput:
        current[:] = [s.seq.request_id for s in batch]
        return real(batch, trees)

    engine.runner.execute = execute  # type: ignore[method-assign]
    return current


def _nan_logits(engine: LLMEngine, victim: SamplingParams) -> None:
    real = engine.runner.execute

    def execute(batch: list[ScheduledSeq], trees: list[DraftTree | None]) -> ForwardOutput:
        out = real(batch, trees)
        for i, s in enumerate(batch):
            if s.seq.params is victim and s.seq.num_output_tokens >= 3:
                with torch.inference_mode():  # the pass's tensors are inference tensors
                    out.logits[out.rows_of(i)] = float("nan")  # this request's rows only
        return out

    engine.runner.execute = execute  # type: ignore[method-assign]


def _raise_in_walk(engine: LLMEngine, victim: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> None:
    current = _current_batch(engine)
    real = verifier._walk

    def walk(job: Any, draws: Any) -> verifier.Verdict:
        seq = engine.sequences.get(current[job.index])
        if seq is not None and seq.params is victim and job.tree is not None:
            raise RuntimeError("injected walk failure")
        return real(job, draws)

    monkeypatch.setattr(verifier, "_walk", walk)


def _raise_in_batched_draw(engine: LLMEngine, victim: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> None:
    real = verifier.sample_rows

    def sample_rows(logits: torch.Tensor, params: list[SamplingParams], *rest: Any) -> Any:
        if any(p is victim for p in params):
            raise RuntimeError("injected sampler failure")
        return real(logits, params, *rest)

    monkeypatch.setattr(verifier, "sample_rows", sample_rows)


Injection = Callable[[LLMEngine, SamplingParams, pytest.MonkeyPatch], None]
INJECTIONS: dict[str, tuple[Injection, str]] = {
    "nan-logits": (lambda e, v, _mp: _nan_logits(e, v), "NaN or infinite"),
    "walk-raises": (_raise_in_walk, "injected walk failure"),
    "batched-draw-raises": (_raise_in_batched_draw, "injected sampler failure"),
}


@pytest.mark.parametrize("kind", list(INJECTIONS))
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_failing_request_fails_alone(
    model_dir: Path, speculator: str, params: SamplingParams, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = [tokens for tokens, _ in _run(_engine(model_dir, None), [params] * len(PROMPTS))]
    engine = _engine(model_dir, speculator)
    # The victim's params are its own object (equal to the others'), so the injection can tell it apart.
    victim = SamplingParams(**{**params.__dict__})
    inject, message = INJECTIONS[kind]
    inject(engine, victim, monkeypatch)
    results = _run(engine, [victim if i == VICTIM else params for i in range(len(PROMPTS))])
    for i, (tokens, final) in enumerate(results):
        if i == VICTIM:
            assert final.finish_reason == FinishReason.ERROR and final.error is not None
            assert message in final.error
            assert tokens == reference[i][: len(tokens)]  # what it streamed before failing was right
        else:
            assert final.finish_reason == FinishReason.LENGTH and final.error is None, final.error
            assert tokens == reference[i]
    stats = engine.stats()
    assert stats.spec_num_drafts > 0, "speculation never ran"
    assert stats.num_free_blocks == stats.num_blocks and not engine.sequences
    assert engine.speculation is not None and not engine.speculation.hidden


def test_unseeded_sampling_with_a_failing_neighbour_finishes(model_dir: Path, speculator: str) -> None:
    engine = _engine(model_dir, speculator)
    victim = SamplingParams(**{**UNSEEDED.__dict__})
    _nan_logits(engine, victim)
    results = _run(engine, [victim if i == VICTIM else UNSEEDED for i in range(len(PROMPTS))])
    reasons = [final.finish_reason for _, final in results]
    assert reasons == [FinishReason.LENGTH, FinishReason.ERROR, FinishReason.LENGTH]
    assert [len(tokens) for i, (tokens, _) in enumerate(results) if i != VICTIM] == [24, 24]


def test_a_request_that_outgrows_the_kv_cache_gets_a_clear_error(model_dir: Path) -> None:
    long = SamplingParams(max_tokens=64, ignore_eos=True)
    short = SamplingParams(max_tokens=8, ignore_eos=True)
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator=None, num_blocks=6,
                          block_size=16, enable_prefix_caching=False)  # fmt: skip
    engine = LLMEngine(config, load_model(config.model, "float32", "cpu"))
    results = _run(engine, [long, short, short])  # the first prompt's 64 more tokens do not fit 96 slots
    reference = _run(_engine(model_dir, None), [long, short, short])
    final = results[0][1]
    assert final.finish_reason == FinishReason.ERROR and final.error is not None and "KV cache" in final.error
    assert [r[0] for r in results[1:]] == [r[0] for r in reference[1:]]
    assert all(r[1].finish_reason == FinishReason.LENGTH for r in results[1:])
