"""benchmarks.step_profile: per-phase step timings of a real (tiny) engine, plain and speculating."""

from __future__ import annotations

from pathlib import Path

from benchmarks.step_profile import profile
from specdesk.engine import LLM
from tests.tiny_models import make_tiny_model


def test_profile_times_every_phase_of_a_speculating_engine(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path)
    llm = LLM(model=str(model), dtype="float32", speculator="ngram", spec_max_batch_size=4)
    llm.shutdown()
    repetitive = [5, 6, 7, 8, 9] * 6  # the n-gram speculator finds its continuations
    result = profile(llm, [repetitive, repetitive[:-1]], max_tokens=24, sync=lambda: None)
    assert result["tokens per step"] > 1.0  # speculation ran and was accepted
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
    every = profile(llm, prompts, max_tokens=8, sync=lambda: None)
    decode = profile(llm, prompts, max_tokens=8, sync=lambda: None, decode_only=True)
    assert every["steps"] == (3 + 7) + (2 + 7)
    assert decode["steps"] == 2 * 7
    assert every["tokens per step"] < decode["tokens per step"] == 1.0
    # The prefill chunks' passes are out of the phase sums, not only out of the count.
    assert decode["  model layers"] * decode["steps"] < every["  model layers"] * every["steps"]
