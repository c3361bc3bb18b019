"""Grammar-constrained decoding end to end: valid output, lossless under speculation and jump-forward, equal to
transformers generate with llguidance's own matcher as the logits processor, bad specs refused at add time."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from specdesk.engine import LLM, FinishReason, SamplingParams, tool_calls
from specdesk.engine.config import EngineConfig
from specdesk.engine.llm_engine import LLMEngine
from specdesk.engine.models.loader import load_model
from specdesk.engine.structured_output import StructuredOutput
from tests.tiny_models import make_tiny_model, make_tiny_speculator

SCHEMA = {
    "type": "object",
    "properties": {
        "order_number": {"type": "string", "pattern": "^[0-9]{5}$"},
        "intent": {"type": "string", "enum": ["refund", "shipping", "password", "other"]},
        "urgency": {"type": "string", "enum": ["low", "high"]},
    },
    "required": ["order_number", "intent", "urgency"],
    "additionalProperties": False,
}
JSON = StructuredOutput("json_schema", json.dumps(SCHEMA))
# Free enough for drafts to survive (the corpus' words), bounded so that greedy output ends.
WORDS = StructuredOutput("regex", "[A-Za-z0-9 ,.]{1,60}")
PROMPTS: list[str | list[int]] = [
    "Your order 48213 ships today. Your order 48213 ships today. Your order 48213 ships",
    "My order number is 48213 and it has not arrived yet. Where is my package?",
    [5, 17, 42, 8, 99, 5, 17, 42, 8, 99, 5, 17],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("grammar-e2e"))


@pytest.fixture(scope="module")
def engines(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LLM]]:
    """float32 engines: plain, n-gram, and a random MLP speculator with n-gram (many wrong drafts)."""
    mlp = make_tiny_speculator(model_dir, tmp_path_factory.mktemp("grammar-mlp") / "speculator")
    speculators = {"plain": None, "ngram": "ngram", "mlp": f"{mlp}+ngram"}
    made = {name: _llm(model_dir, spec) for name, spec in speculators.items()}
    try:
        yield made
    finally:
        for llm in made.values():
            llm.shutdown()


def _llm(model_dir: Path, speculator: str | None) -> LLM:
    return LLM(model=str(model_dir), dtype="float32", device="cpu", speculator=speculator, spec_max_batch_size=16)


def params(structured: StructuredOutput, speculate: bool = True, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=64, structured_output=structured, speculate=speculate, **kw)


def test_constrained_greedy_output_is_valid_json(engines: dict[str, LLM]) -> None:
    for out in engines["plain"].generate(PROMPTS, params(JSON, speculate=False)):
        value = json.loads(out.text)
        assert out.finish_reason == FinishReason.STOP, out.text
        assert set(value) == set(SCHEMA["properties"])  # type: ignore[arg-type]
        assert re.fullmatch("[0-9]{5}", value["order_number"]) and value["urgency"] in ("low", "high")


@pytest.mark.parametrize("spec", ["ngram", "mlp"])
def test_speculation_and_jump_forward_equal_constrained_plain_decoding(engines: dict[str, LLM], spec: str) -> None:
    for structured in (JSON, WORDS):
        plain = [o.token_ids for o in engines["plain"].generate(PROMPTS, params(structured, speculate=False))]
        before = engines[spec].stats().spec_num_drafts
        fast = [o.token_ids for o in engines[spec].generate(PROMPTS, params(structured))]
        assert fast == plain, structured.kind
        if structured is WORDS:  # drafts of the prompt's words survive the grammar: trees were verified
            assert engines[spec].stats().spec_num_drafts > before


def test_seeded_sampling_is_unchanged_by_speculation_under_a_grammar(engines: dict[str, LLM]) -> None:
    sampled = {"temperature": 0.9, "top_k": 40, "seed": 7}
    for structured in (WORDS, JSON):  # seeded per position: a jump-forward skips no randomness
        plain = engines["plain"].generate(PROMPTS, params(structured, speculate=False, **sampled))
        fast = engines["mlp"].generate(PROMPTS, params(structured, **sampled))
        assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
    for out in fast:
        json.loads(out.text)


def test_jump_forward_tokens_count_as_tokens_of_their_step(engines: dict[str, LLM]) -> None:
    llm = engines["plain"]
    slow = llm.generate(PROMPTS[1], params(JSON, speculate=False))[0]
    forced_before = llm.stats().grammar_num_forced_tokens
    fast = llm.generate(PROMPTS[1], params(JSON))[0]
    assert fast.token_ids == slow.token_ids
    num_forced = llm.stats().grammar_num_forced_tokens - forced_before
    stats = llm.engine.grammar_compiler.stats
    assert stats.num_prefetched_rows == stats.num_masked_rows > 0  # every mask was computed during the pass
    assert num_forced >= 10  # '{"order_number":"', '","intent":"', ... are forced
    assert slow.metrics is not None and fast.metrics is not None
    assert slow.metrics.tokens_per_step == pytest.approx(1.0)
    assert fast.metrics.num_decode_steps <= slow.metrics.num_decode_steps - num_forced + 1
    assert fast.metrics.tokens_per_step > 1.5


def test_a_bad_spec_fails_at_add_time_and_leaves_other_requests_alone(model_dir: Path) -> None:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator="ngram")
    engine = LLMEngine(config, load_model(config.model, "float32", "cpu"))
    prompt = engine.tokenizer.encode("My order")
    good = engine.add_request(prompt, params(JSON))
    tokens = [t for delta in engine.step() for t in delta.token_ids]  # in flight when the bad ones come
    for bad in (
        StructuredOutput("json_schema", '{"type": "integer", "minimum": 3, "maximum": 1}'),
        StructuredOutput("regex", "(unclosed"),
        StructuredOutput("ebnf", "root ::= undefined_rule"),
    ):
        with pytest.raises(ValueError, match=f"structured output {bad.kind} is invalid"):
            engine.add_request(prompt, params(bad))
    while engine.has_work:
        for delta in engine.step():
            assert delta.request_id == good and delta.error is None
            tokens += delta.token_ids
    alone = _llm(model_dir, None)
    try:
        assert tokens == alone.generate([prompt], params(JSON, speculate=False))[0].token_ids
    finally:
        alone.shutdown()


def test_tool_call_grammars_under_speculation(engines: dict[str, LLM]) -> None:
    fn = {"name": "lookup_order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string",
          "pattern": "^[0-9]{5}$"}}, "required": ["order_id"]}}  # fmt: skip
    auto, required = (tool_calls.structured_output([fn], choice, False) for choice in ("auto", "lookup_order"))
    assert auto is not None and required is not None
    for structured in (auto, required):  # free text with a lazy <tool_call> trigger; the call object itself
        plain = engines["plain"].generate(PROMPTS, params(structured, speculate=False))
        assert [o.token_ids for o in engines["mlp"].generate(PROMPTS, params(structured))] == [
            o.token_ids for o in plain
        ]
    for out in plain:
        assert json.loads(out.text)["name"] == "lookup_order"


def test_preempted_constrained_requests_resume_their_grammar(model_dir: Path, engines: dict[str, LLM]) -> None:
    plain = [o.token_ids for o in engines["plain"].generate(PROMPTS, params(JSON, speculate=False))]
    num_blocks = (max(len(engines["plain"].encode(p)) for p in PROMPTS) + 64) // 16 + 2
    tight = LLM(model=str(model_dir), dtype="float32", device="cpu", speculator="ngram", num_blocks=num_blocks,
                enable_prefix_caching=False)  # fmt: skip
    try:
        assert [o.token_ids for o in tight.generate(PROMPTS, params(JSON))] == plain
        assert tight.stats().num_preemptions > 0
    finally:
        tight.shutdown()


def test_a_draft_tree_follows_the_forced_tokens_in_the_next_pass(model_dir: Path, engines: dict[str, LLM]) -> None:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator="ngram")
    engine = LLMEngine(config, load_model(config.model, "float32", "cpu"))
    prompt = engine.tokenizer.encode('{"order_number":"48213","intent":"refund","urgency":"low"} My order')
    rid = engine.add_request(prompt, params(JSON))
    seq = engine.sequences[rid]
    (delta,) = engine.step()  # prefill: '{"order_number":"' is forced after the first token
    tokens = list(delta.token_ids)
    assert len(tokens) > 1 and seq.num_uncomputed_tokens == len(tokens)
    assert engine.speculation is not None
    engine.speculation.propose(engine.scheduler.running, engine.block_manager.usage)
    assert seq.draft_token_ids  # the prompt's own JSON is an n-gram match
    batch = engine.scheduler.schedule()
    (s,) = batch.scheduled
    assert s.num_new_tokens == len(tokens) and s.num_draft_tokens == len(seq.draft_token_ids)
    (verdict,) = engine._run(batch)  # the forced tokens' KV and the tree, in one pass
    assert verdict.error is None and verdict.acceptance is not None
    tokens += engine._append(s, verdict.tokens, 0.0)[0].token_ids
    while engine.has_work:
        tokens += [t for d in engine.step() for t in d.token_ids]
    assert tokens == engines["plain"].generate([prompt], params(JSON, speculate=False))[0].token_ids


def test_a_failing_grammar_fails_its_request_alone(model_dir: Path, engines: dict[str, LLM]) -> None:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", speculator="ngram")
    engine = LLMEngine(config, load_model(config.model, "float32", "cpu"))
    prompt = engine.tokenizer.encode(str(PROMPTS[0]))
    broken, _ = (engine.add_request(prompt, params(structured)) for structured in (JSON, WORDS))

    def fail(*args: object) -> None:
        raise RuntimeError("matcher broke")

    grammar = engine.sequences[broken].grammar
    assert grammar is not None
    grammar.advance = fail  # type: ignore[method-assign]
    grammar.prune = fail  # type: ignore[method-assign]
    tokens: list[int] = []
    errors: list[str | None] = []
    while engine.has_work:
        for delta in engine.step():
            if delta.request_id == broken:
                errors.append(delta.error)
            else:
                tokens += delta.token_ids
    assert len(errors) == 1 and errors[0] is not None and "matcher broke" in errors[0]
    assert tokens == engines["plain"].generate([prompt], params(WORDS, speculate=False))[0].token_ids


def test_llm_refuses_a_bad_spec_in_the_callers_thread(engines: dict[str, LLM]) -> None:
    with pytest.raises(ValueError, match="structured output regex is invalid"):
        engines["plain"].submit("My order", params(StructuredOutput("regex", "[z-a]")))
    assert engines["plain"].generate("My order", params(JSON))[0].finish_reason == FinishReason.STOP


def test_the_grammar_ends_a_request_that_ignores_eos(engines: dict[str, LLM]) -> None:
    out = engines["ngram"].generate(PROMPTS[0], params(JSON, ignore_eos=True))[0]
    json.loads(out.text)
    assert out.finish_reason == FinishReason.STOP and len(out.token_ids) < 64


def test_constrained_greedy_equals_transformers_with_llguidance_as_its_logits_processor(
    engines: dict[str, LLM], model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = engines["mlp"]
    for prompt in PROMPTS:
        ids = llm.encode(prompt)
        ours = llm.generate([ids], params(JSON))[0].token_ids
        processor = _LLGuidanceProcessor(tokenizer, json.dumps(SCHEMA), len(ids))
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=64,
            do_sample=False, logits_processor=[processor], eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        )  # fmt: skip
        assert ours == out[0, len(ids) :].tolist()


class _LLGuidanceProcessor:
    """transformers LogitsProcessor straight on llguidance's matcher (none of SpecDesk's grammar code)."""

    def __init__(self, tokenizer: Any, schema: str, prompt_len: int) -> None:
        import llguidance
        import llguidance.hf

        ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=[tokenizer.eos_token_id])
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        self.vocab_size = ll_tokenizer.vocab_size
        self.prompt_len = prompt_len
        self.num_consumed = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import llguidance.torch

        new = input_ids[0, self.prompt_len + self.num_consumed :].tolist()
        assert self.matcher.consume_tokens(new), self.matcher.get_error()
        self.num_consumed += len(new)
        mask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
        llguidance.torch.fill_next_token_bitmask(self.matcher, mask)
        bits = ((mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[: self.vocab_size]
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        allowed[: self.vocab_size] = bits.bool()
        return scores.masked_fill(~allowed, float("-inf"))


@pytest.mark.slow
def test_default_model_constrained_output_is_lossless_with_its_speculator() -> None:
    llm = LLM(dtype="float32", device="cpu")  # the shipped MLP speculator + n-gram
    try:
        chats = [
            [{"role": "system", "content": "Reply with JSON: order_number (5 digits), intent, urgency."},
             {"role": "user", "content": text}]
            for text in ("Order 48213 never arrived and I need it tomorrow!", "How do I reset my password?")
        ]  # fmt: skip
        plain = llm.generate(chats, params(JSON, speculate=False))
        fast = llm.generate(chats, params(JSON))
        assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
        assert all(json.loads(o.text)["urgency"] in ("low", "high") for o in fast)
        assert llm.stats().spec_num_drafts > 0 and llm.stats().grammar_num_forced_tokens > 0
    finally:
        llm.shutdown()
