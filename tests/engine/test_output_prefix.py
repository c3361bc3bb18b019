"""A reply continued from tokens generated elsewhere (a Ray replica died mid-reply): `output_prefix` counts
as output for max_tokens, penalties and the grammar, is not streamed again, and the continuation is exactly
what one uninterrupted request writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from specdesk.engine import LLM, SamplingParams
from specdesk.engine.structured_output import StructuredOutput
from tests.tiny_models import make_tiny_model

SCHEMA = {"type": "object", "properties": {"order": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["order", "n"]}  # fmt: skip
PARAMS = [
    SamplingParams(max_tokens=40, ignore_eos=True),
    SamplingParams(max_tokens=40, ignore_eos=True, frequency_penalty=0.9, presence_penalty=0.5),
    SamplingParams(max_tokens=40, temperature=1.0, seed=5, repetition_penalty=1.2),
    SamplingParams(max_tokens=40, structured_output=StructuredOutput("json_schema", SCHEMA)),
]


@pytest.fixture(scope="module", params=[None, "ngram"], ids=["plain", "ngram"])
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    path: Path = make_tiny_model("llama", tmp_path_factory.mktemp("prefix"))
    engine = LLM(model=str(path), dtype="float32", device="cpu", speculator=request.param, kv_cache_memory_gib=0.02)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "penalties", "seeded", "schema"])
def test_the_continuation_equals_the_uninterrupted_reply(llm: LLM, params: SamplingParams) -> None:
    prompt = "Hello, thank you for contacting customer care. My order"
    full = llm.generate([prompt], params)[0]
    assert len(full.token_ids) > 12
    for cut in (1, 7, len(full.token_ids) - 2):
        deltas = list(llm.deltas(llm.submit(prompt, params, output_prefix=full.token_ids[:cut])))
        assert deltas[-1].error is None and deltas[-1].finish_reason == full.finish_reason
        assert [t for d in deltas for t in d.token_ids] == full.token_ids[cut:], cut
        # Only the continuation is streamed: its text ends the reply's and the prefix's is not repeated.
        tail = "".join(d.text for d in deltas)
        assert full.text.endswith(tail) and (cut < 7 or len(tail) < len(full.text))


def test_a_prefix_the_grammar_forbids_or_too_long_fails_that_request_alone(llm: LLM) -> None:
    bad = llm.tokenizer.encode("not json", add_special_tokens=False)
    for params, prefix, message in ((PARAMS[3], bad, "does not match the grammar"),
                                    (SamplingParams(max_tokens=3), [5, 6, 7], "max_tokens")):  # fmt: skip
        final = list(llm.deltas(llm.submit("Hi", params, output_prefix=prefix)))[-1]
        assert final.error is not None and message in final.error
    # A prefix that already completes the output (its last token ends the grammar) leaves nothing to generate.
    short = SamplingParams(max_tokens=8, structured_output=StructuredOutput("regex", "(yes|no)"))
    complete = llm.generate(["Hi"], short)[0]
    assert complete.finish_reason is not None and complete.finish_reason.value == "stop"
    final = list(llm.deltas(llm.submit("Hi", short, output_prefix=complete.token_ids)))[-1]
    assert final.error is not None and "already completes the structured output" in final.error
    assert llm.generate(["Hi"], SamplingParams(max_tokens=2))[0].token_ids  # the engine serves on
