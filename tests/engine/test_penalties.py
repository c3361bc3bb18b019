"""Penalties, logit bias, min_p and logprobs: transformers as the oracle, and lossless under speculation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.logits_processors import SeenTokens, _penalize, process_rows
from tests.tiny_models import make_tiny_model, make_tiny_speculator

# Repetitive prompts make the n-gram speculator propose (and penalties matter: the tokens recur).
PROMPTS: list[str | list[int]] = [
    "Your order 48213 ships today. Your order 48213 ships today. Your order 48213 ships",
    "Hello, thank you for contacting customer care.",
    [5, 17, 42, 8, 99, 5, 17, 42, 8, 99, 5, 17],
]
PENALIZED = [
    {"repetition_penalty": 1.3},
    {"frequency_penalty": 0.8},
    {"presence_penalty": 1.1},
    {"frequency_penalty": -0.5, "presence_penalty": 0.4, "repetition_penalty": 0.9},
    {"logit_bias": {7: 5.0, 42: -100.0, 99: 2.5}},
    {"repetition_penalty": 1.2, "frequency_penalty": 0.3, "logit_bias": {"13": 1.5}},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("pen"))


@pytest.fixture(scope="module")
def mlp_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_speculator(model_dir, tmp_path_factory.mktemp("pen-mlp") / "speculator")


@pytest.fixture(scope="module")
def engines(model_dir: Path, mlp_dir: Path) -> dict[str, LLM]:
    """float32 engines: plain, n-gram, and MLP + n-gram speculation (random MLP: many wrong drafts)."""
    made = {
        name: LLM(
            model=str(model_dir),
            dtype="float32",
            device="cpu",
            speculator=spec,
            spec_max_batch_size=16,
            kv_cache_memory_gib=0.02,
        )
        for name, spec in (("plain", None), ("ngram", "ngram"), ("mlp", f"{mlp_dir}+ngram"))
    }
    yield made
    for llm in made.values():
        llm.shutdown()


# ---- the processing itself ------------------------------------------------------------------------------
def test_repetition_penalty_equals_transformers_on_every_tree_row() -> None:
    torch.manual_seed(0)
    vocab = 64
    history = [3, 9, 9, 20, 41, 3]
    paths = [[], [7], [7, 9], [50], [50, 63, 3]]
    logits = torch.randn(len(paths), vocab) * 4
    params = SamplingParams(repetition_penalty=1.7)
    ours = process_rows(logits, params, history, 2, paths, None)
    for i, path in enumerate(paths):
        ids = torch.tensor([history + path])
        theirs = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], theirs[0], rtol=0, atol=0)


def test_frequency_presence_and_bias_follow_openai_over_the_output_and_each_path() -> None:
    torch.manual_seed(1)
    vocab = 32
    history = [1, 2, 3, 4, 4, 5, 4, 6]  # prompt = the first 3 tokens: they never count
    paths = [[], [4], [6, 6, 2]]
    logits = torch.randn(len(paths), vocab)
    params = SamplingParams(frequency_penalty=0.6, presence_penalty=-0.3, logit_bias={"2": 4.0, 31: -7.5})
    ours = process_rows(logits, params, history, 3, paths, None)
    for i, path in enumerate(paths):
        expected = logits[i].clone()
        expected[2] += 4.0
        expected[31] += -7.5
        output = history[3:] + path
        for token in set(output):
            expected[token] -= 0.6 * output.count(token) + (-0.3)
        torch.testing.assert_close(ours[i], expected)


def test_a_row_of_a_tree_is_processed_as_plain_decoding_would_after_its_path() -> None:
    torch.manual_seed(2)
    params = SamplingParams(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.2)
    history, paths = [8, 1, 1, 5, 9], [[], [1], [1, 5], [3], [3, 3, 3]]
    logits = torch.randn(len(paths), 16)
    together = process_rows(logits, params, history, 2, paths, None)
    for i, path in enumerate(paths):
        alone = process_rows(logits[i : i + 1], params, history + path, 2, [[]], None)
        torch.testing.assert_close(together[i : i + 1], alone)


def test_a_plain_row_is_penalized_as_a_tree_row_and_as_transformers_does() -> None:
    """The one-row path (a plain row, repetition penalty only, numpy's mask of the seen ids) against the general
    path (two rows) and transformers, bit for bit, on a real vocabulary with ids past its columns."""
    gen = torch.Generator().manual_seed(4)
    vocab = 49152
    history = torch.randint(0, vocab + 100, (830,), generator=gen).tolist()
    logits = torch.randn(2, vocab, generator=gen) * 4
    params = SamplingParams(repetition_penalty=1.1)
    alone = process_rows(logits[:1], params, history, 700, [[]], None)
    assert torch.equal(alone[0], process_rows(logits, params, history, 700, [[], []], None)[0])
    kept = torch.tensor([[t for t in history if t < vocab]])
    torch.testing.assert_close(alone, RepetitionPenaltyLogitsProcessor(1.1)(kept, logits[:1].clone()), rtol=0, atol=0)
    assert not torch.equal(alone[0], logits[0])


def test_token_ids_past_the_logits_columns_are_left_out() -> None:
    """A model whose output layer is smaller than its tokenizer's vocabulary: ids without a column change nothing,
    and the prompt/output split still counts only the output's tokens."""
    torch.manual_seed(3)
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.1)
    history, paths = [2, 40, 5, 7, 41, 7, 3], [[], [44, 5], [7]]  # vocab 32: 40, 41 and 44 have no column
    logits = torch.randn(len(paths), 32)
    ours = process_rows(logits, params, history, 3, paths, None)
    kept = [t for t in history if t < 32]  # [2, 5, 7, 7, 3]: the prompt's valid tokens are [2, 5]
    for i, path in enumerate(paths):
        path_kept = [t for t in path if t < 32]
        expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([kept + path_kept]), logits[i : i + 1].clone())[0]
        output = kept[2:] + path_kept
        for token in set(output):
            expected[token] -= 0.4 * output.count(token) + 0.1
        torch.testing.assert_close(ours[i], expected)


def test_a_requests_seen_tokens_kept_across_steps_give_the_bits_of_a_fresh_set() -> None:
    """The CPU keeps each request's seen ids from step to step (SeenTokens): every step, with a tree, equals a set
    built afresh, transformers, and the torch path a GPU takes, bit for bit; steps add 1-3 tokens, sometimes 40,
    with repeats and ids past the logits' columns."""
    gen = torch.Generator().manual_seed(5)
    vocab = 500
    history = torch.randint(0, vocab, (60,), generator=gen).tolist()
    params = SamplingParams(repetition_penalty=1.15)
    seen = SeenTokens()
    for step in range(40):
        grow = 40 if step % 13 == 7 else 1 + step % 3
        history += torch.randint(0, vocab + 20, (grow,), generator=gen).tolist()
        a, b = history[-1], int(torch.randint(0, vocab, (1,), generator=gen))
        paths = [[], [a], [a, b], [b, b, vocab + 3]]
        logits = torch.randn(len(paths), vocab, generator=gen) * 3
        kept = process_rows(logits, params, history, 50, paths, None, seen)
        assert torch.equal(kept, process_rows(logits, params, history, 50, paths, None))
        torch_path = logits.clone()
        _penalize(torch_path, params, history, 50, paths)  # the GPU's way
        assert torch.equal(kept, torch_path)
        for i, path in enumerate(paths):
            ids = torch.tensor([[t for t in history + path if t < vocab]])
            theirs = RepetitionPenaltyLogitsProcessor(1.15)(ids, logits[i : i + 1].clone())
            assert torch.equal(kept[i], theirs[0])
        assert sorted(seen.ids.tolist()) == sorted({t for t in history if t < vocab})
        assert len(seen.ids) == len(set(seen.ids.tolist()))


def test_seen_tokens_start_over_on_a_history_that_does_not_extend_the_last() -> None:
    seen = SeenTokens()
    assert sorted(seen.update([4, 8, 8, 15], 32).ids.tolist()) == [4, 8, 15]
    assert sorted(seen.update([4, 8, 8, 16, 23], 32).ids.tolist()) == [4, 8, 16, 23]  # another token where 15 was
    assert sorted(seen.update([42, 9], 64).ids.tolist()) == [9, 42]  # shorter, and another vocabulary
    assert sorted(seen.update([42, 9, 9, 1], 64).ids.tolist()) == [1, 9, 42]  # extended: only the new ones


# ---- end to end: lossless under speculation ----------------------------------------------------------
@pytest.mark.parametrize("extra", PENALIZED, ids=lambda e: ",".join(e))
def test_penalized_greedy_output_is_identical_with_and_without_speculation(
    engines: dict[str, LLM], extra: dict[str, object]
) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True, **extra)  # type: ignore[arg-type]
    plain = [o.token_ids for o in engines["plain"].generate(PROMPTS, params)]
    unpenalized = [
        o.token_ids for o in engines["plain"].generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    ]
    assert plain != unpenalized, "the parameters changed nothing: the test would not see a wrong implementation"
    for name in ("ngram", "mlp"):
        before = engines[name].stats().spec_num_drafts
        assert [o.token_ids for o in engines[name].generate(PROMPTS, params)] == plain, name
    # The random MLP drafts every step (penalized output rarely repeats itself for the n-gram lookup).
    assert engines["mlp"].stats().spec_num_drafts > before, "speculation never ran"


@pytest.mark.parametrize(
    "extra", [{"repetition_penalty": 1.3, "min_p": 0.05}, {"frequency_penalty": 0.7, "top_k": 20}, {"min_p": 0.2}]
)
def test_seeded_sampling_with_penalties_and_min_p_is_identical_with_speculation(
    engines: dict[str, LLM], extra: dict[str, object]
) -> None:
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=24, ignore_eos=True, **extra)  # type: ignore[arg-type]
    plain = [o.token_ids for o in engines["plain"].generate(PROMPTS, params)]
    for name in ("ngram", "mlp"):
        assert [o.token_ids for o in engines[name].generate(PROMPTS, params)] == plain, name


def test_greedy_repetition_penalty_equals_transformers_generate(engines: dict[str, LLM], model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = engines["plain"].encode(PROMPTS[0])  # type: ignore[arg-type]
    ids = torch.tensor([prompt])
    ref = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False,
        repetition_penalty=1.3, pad_token_id=0,
    )[0, len(prompt) :].tolist()  # fmt: skip
    params = SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    for name in ("plain", "mlp"):
        assert engines[name].generate([prompt], params)[0].token_ids == ref, name


# ---- logprobs ---------------------------------------------------------------------------------------------
def test_logprobs_equal_transformers_and_do_not_depend_on_speculation(engines: dict[str, LLM], model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=3, repetition_penalty=1.2)
    plain = engines["plain"].generate(PROMPTS, params)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for out in plain:
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        full = torch.tensor([out.prompt_token_ids + out.token_ids])
        with torch.no_grad():
            raw = model(full).logits[0, len(out.prompt_token_ids) - 1 : -1].float().log_softmax(-1)
        for i, entry in enumerate(out.logprobs):
            assert entry.token_id == out.token_ids[i]
            assert entry.logprob == pytest.approx(raw[i, entry.token_id].item(), abs=1e-4)
            top = raw[i].topk(3)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    for name in ("ngram", "mlp"):
        spec = engines[name].generate(PROMPTS, params)
        for a, b in zip(plain, spec, strict=True):
            assert a.token_ids == b.token_ids
            assert b.logprobs is not None
            assert [e.logprob for e in b.logprobs] == pytest.approx([e.logprob for e in a.logprobs or []], abs=1e-4)
            assert [[t for t, _ in e.top] for e in b.logprobs] == [[t for t, _ in e.top] for e in a.logprobs or []]


def test_streamed_logprobs_match_the_streamed_tokens_and_stop_strings_cut_both(engines: dict[str, LLM]) -> None:
    llm = engines["mlp"]
    full = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2 :][:3]
    params = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=0, stop=(stop,))
    deltas = list(llm.stream(PROMPTS[1], params))
    for d in deltas:
        assert d.logprobs is None or [e.token_id for e in d.logprobs] == d.token_ids
        assert d.logprobs is None or all(e.top == () for e in d.logprobs)
    out = llm.generate([PROMPTS[1]], params)[0]
    assert out.logprobs is not None and [e.token_id for e in out.logprobs] == out.token_ids


def test_no_logprobs_unless_asked(engines: dict[str, LLM]) -> None:
    assert engines["mlp"].generate([PROMPTS[0]], SamplingParams(max_tokens=4))[0].logprobs is None


@pytest.mark.slow
def test_default_model_penalized_output_and_logprobs_are_identical_with_speculation() -> None:
    """The shipped MLP speculator + n-gram on the default model (float32): penalties, min_p and logprobs."""
    from transformers import AutoModelForCausalLM

    from specdesk.engine.models.default_model import default_model_path

    conversations = [
        [{"role": "user", "content": "My router keeps dropping the connection every evening. What can I do?"}],
        [{"role": "system", "content": "You are a support agent for Acme Telecom."},
         {"role": "user", "content": "I was charged twice for my phone bill this month."}],
    ]  # fmt: skip
    plain = LLM(dtype="float32", device="cpu", speculator=None)
    spec = LLM(dtype="float32", device="cpu", spec_max_batch_size=16)
    try:
        for params in (
            SamplingParams(max_tokens=48, repetition_penalty=1.1, logprobs=2),
            SamplingParams(max_tokens=48, frequency_penalty=0.4, presence_penalty=0.2),
            SamplingParams(temperature=0.8, seed=3, max_tokens=48, repetition_penalty=1.1, min_p=0.05),
            SamplingParams(max_tokens=48, logit_bias={plain.encode("Thank")[0]: 8.0, plain.encode(" you")[0]: -5.0}),
        ):
            want = plain.generate(conversations, params)
            got = spec.generate(conversations, params)
            assert [o.token_ids for o in got] == [o.token_ids for o in want], params
            if params.logprobs is not None:
                for a, b in zip(want, got, strict=True):
                    assert [e.logprob for e in b.logprobs or []] == pytest.approx(
                        [e.logprob for e in a.logprobs or []], abs=1e-4
                    )
        assert spec.stats().spec_num_accepted_tokens > 0, "speculation never paid off once: was it on?"
        hf = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
        ids = plain.encode(conversations[0])
        ref = hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=32,
            min_new_tokens=32, do_sample=False, repetition_penalty=1.1, pad_token_id=0,
        )[0, len(ids) :].tolist()  # fmt: skip
        params = SamplingParams(max_tokens=32, ignore_eos=True, repetition_penalty=1.1)
        assert spec.generate([ids], params)[0].token_ids == ref
    finally:
        plain.shutdown()
        spec.shutdown()
