"""The grammar package on its own: masks along draft paths, rollback, pruning, forced tokens, bad specs."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import torch

from specdesk.engine.grammar import GrammarCompiler, GrammarState
from specdesk.engine.speculators.tree import build_tree
from specdesk.engine.structured_output import StructuredOutput
from tests.tiny_models import make_tiny_model

SCHEMA = {
    "type": "object",
    "properties": {
        "order_number": {"type": "string", "pattern": "^[0-9]{5}$"},
        "urgency": {"type": "string", "enum": ["low", "high"]},
    },
    "required": ["order_number", "urgency"],
    "additionalProperties": False,
}
ANSWER = '{"order_number":"48213","urgency":"high"}'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_model("qwen2", tmp_path_factory.mktemp("grammar")))


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, [tokenizer.eos_token_id])


def schema_state(compiler: GrammarCompiler) -> GrammarState:
    return compiler.compile(StructuredOutput("json_schema", json.dumps(SCHEMA)))


def allowed(state: GrammarState, path: list[int], vocab_size: int) -> list[int]:
    return state.allowed_rows([path], vocab_size)[0].nonzero().flatten().tolist()


def test_masks_follow_each_path_and_leave_the_state_unchanged(compiler: GrammarCompiler, tokenizer: Any) -> None:
    state = schema_state(compiler)
    answer = tokenizer.encode(ANSWER)
    v = len(tokenizer)
    before = state.allowed_rows([[]], v)
    forced = state.forced_tokens()
    paths = [answer[:i] for i in range(len(answer) + 1)]
    rows = state.allowed_rows(paths, v)
    assert rows.shape == (len(paths), v) and rows.dtype == torch.bool
    for i, token in enumerate(answer):
        assert rows[i, token], (i, tokenizer.decode(answer[:i]))
        assert not rows[i, tokenizer.eos_token_id]  # the object is not closed yet
    assert rows[-1].nonzero().flatten().tolist() == [tokenizer.eos_token_id]  # EOS exactly at the end
    assert torch.equal(state.allowed_rows([[]], v), before) and state.forced_tokens() == forced
    state.advance(answer[:3])  # the walks rolled back: the verified state still takes the answer
    assert allowed(state, [], v) == allowed(schema_state(compiler), answer[:3], v)


def test_ids_past_the_tokenizer_are_never_allowed(compiler: GrammarCompiler, tokenizer: Any) -> None:
    state = schema_state(compiler)
    v = len(tokenizer)
    rows = state.allowed_rows([[]], v + 64)
    assert not rows[0, v:].any() and torch.equal(rows[0, :v], state.allowed_rows([[]], v)[0])


def test_a_rejected_path_gives_a_row_that_cannot_poison_sampling(compiler: GrammarCompiler, tokenizer: Any) -> None:
    state = schema_state(compiler)
    bad = tokenizer.encode("hello")
    assert not state.allowed_rows([[]], len(tokenizer))[0, bad[0]]
    rows = state.allowed_rows([[], bad, bad[:1]], len(tokenizer))
    assert rows[1:].all()  # unreachable rows: any finite row is right there
    assert rows[0].sum() < len(tokenizer)


def test_prune_keeps_exactly_the_allowed_nodes(compiler: GrammarCompiler, tokenizer: Any) -> None:
    state = schema_state(compiler)
    answer = tokenizer.encode(ANSWER)
    wrong = tokenizer.encode("x")[0]
    good = answer[:4]
    assert state.prune(build_tree([good])) is not None
    tree = build_tree([good, [*answer[:2], wrong, answer[2]], [wrong, *answer[:2]], [answer[0], wrong]])
    pruned = state.prune(tree)
    # Surviving root-to-leaf paths in their original order; the cut paths keep their allowed prefixes.
    assert pruned == build_tree([good, answer[:2], answer[:1]])
    assert pruned is not None and pruned.tokens == good  # the prefixes merge into the first path's nodes
    assert state.prune(build_tree([[wrong, *answer]])) is None
    unchanged = build_tree([good, answer[:2]])
    assert state.prune(unchanged) is unchanged
    assert state.allowed_rows([[]], len(tokenizer))[0].sum() >= 1 and not state._walked


def test_prune_drops_what_follows_an_end_of_sequence(compiler: GrammarCompiler, tokenizer: Any) -> None:
    state = schema_state(compiler)
    answer = tokenizer.encode(ANSWER)
    state.advance(answer[:-1])
    eos = tokenizer.eos_token_id
    pruned = state.prune(build_tree([[answer[-1], eos, answer[0]]]))
    assert pruned == build_tree([[answer[-1], eos]])


def test_forced_tokens_are_each_the_only_allowed_token(compiler: GrammarCompiler, tokenizer: Any) -> None:
    state = schema_state(compiler)
    v = len(tokenizer)
    forced = state.forced_tokens()
    assert tokenizer.decode(forced) == '{"order_number":"'
    for i, token in enumerate(forced):
        assert allowed(state, forced[:i], v) == [token]
    assert len(allowed(state, forced, v)) > 1  # a digit: the model's choice
    assert state.forced_tokens(max_tokens=2) == forced[:2]
    state.advance(forced)
    state.advance(tokenizer.encode('48213","urgency":"hi'))
    tail = state.forced_tokens()
    assert tokenizer.decode(tail[:-1]) == 'gh"}' and tail[-1] == tokenizer.eos_token_id  # EOS: the sole end
    state.advance(tail[:-1])
    assert state.forced_tokens() == [tokenizer.eos_token_id] and not state.is_terminated
    state.advance([tokenizer.eos_token_id])
    assert state.is_terminated and state.forced_tokens() == []


def test_advance_refuses_a_token_the_grammar_forbids(compiler: GrammarCompiler, tokenizer: Any) -> None:
    state = schema_state(compiler)
    with pytest.raises(ValueError, match="does not match the grammar"):
        state.advance(tokenizer.encode("x"))


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}', "json_schema is invalid"),
        ("json_schema", '{"type": "nonsense"}', "json_schema is invalid"),
        ("json_schema", "[1, 2]", "must be an object"),
        ("regex", "(unclosed", "regex is invalid"),
        ("ebnf", "root ::= missing", "ebnf is invalid"),
        ("structural_tag", '{"format": {"type": "triggered_tags", "triggers": ["<a>"], "tags": []}}', "tags"),
        ("structural_tag", '{"format": {"type": "tag", "begin": "<a>", "content": {"type": "weird"}}}', "weird"),
    ],
)
def test_a_bad_spec_is_a_value_error(compiler: GrammarCompiler, kind: Any, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compiler.compile(StructuredOutput(kind, spec))


def test_a_schema_past_the_parsers_limits_is_refused_at_compile(compiler: GrammarCompiler) -> None:
    # Within the grammar size limit, but the first token's step exceeds the parser's (2000 items in a row): it
    # used to compile, then fail the request at its first token as an engine error.
    properties = {f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i % 50},{i % 50 + 5}}}x{i}"} for i in range(2000)}
    with pytest.raises(ValueError, match=r"json_schema is too large for the grammar parser: .*max is 2000"):
        compiler.compile(StructuredOutput("json_schema", json.dumps({"type": "object", "properties": properties})))


def test_a_cached_spec_never_waits_for_another_spec_compiling(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id])
    cached, slow = StructuredOutput("json_object"), StructuredOutput("regex", "[0-9]{3}")
    compiler.compile(cached)
    compile_for_real, release = compiler._compile, threading.Event()

    def held_up(spec: StructuredOutput) -> Any:
        if spec == slow:  # a big schema taking seconds
            assert release.wait(30)
        return compile_for_real(spec)

    monkeypatch.setattr(compiler, "_compile", held_up)
    compiling = threading.Thread(target=compiler.compile, args=(slow,))
    compiling.start()
    try:
        assert compiler.compile(cached).forced_tokens() is not None  # served while the other compiles
        assert compiling.is_alive()
    finally:
        release.set()
        compiling.join()
    assert compiler.num_compiled == 2 and compiler.compile(slow) is not None


def test_compiled_grammars_are_cached_per_spec(tokenizer: Any) -> None:
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id], cache_size=2)
    a = StructuredOutput("json_schema", SCHEMA)  # type: ignore[arg-type]  # a dict is serialized in its order
    b = StructuredOutput("regex", "[0-9]{3}")
    first, second = (
        compiler.compile(a),
        compiler.compile(StructuredOutput("json_schema", json.dumps(SCHEMA))),
    )
    assert compiler.num_compiled == 1 and first is not second  # one compilation, two independent states
    first.advance(first.forced_tokens())
    assert second.forced_tokens() == compiler.compile(a).forced_tokens()
    compiler.compile(b)
    compiler.compile(StructuredOutput("json_object"))  # evicts the schema (least recently used)
    compiler.compile(a)
    assert compiler.num_compiled == 4


def test_regex_ebnf_and_json_object(compiler: GrammarCompiler, tokenizer: Any) -> None:
    v = len(tokenizer)
    digits = compiler.compile(StructuredOutput("regex", "[0-9]{2}"))
    for token in allowed(digits, [], v):
        assert tokenizer.decode([token]).isdigit()
    ebnf = compiler.compile(StructuredOutput("ebnf", 'root ::= "yes" | "no"'))
    assert {tokenizer.decode([t]) for t in allowed(ebnf, [], v)} <= {"y", "ye", "yes", "n", "no"}
    obj = compiler.compile(StructuredOutput("json_object"))
    assert tokenizer.decode(obj.forced_tokens())[:1] == "{"


def test_structural_tag_frees_text_until_the_trigger(compiler: GrammarCompiler, tokenizer: Any) -> None:
    call = {"type": "object", "properties": {"urgency": {"enum": ["low", "high"]}}, "required": ["urgency"]}
    tag = {"type": "tag", "begin": "<call>", "content": {"type": "json_schema", "json_schema": call}, "end": "</call>"}
    spec = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<call>"], "tags": [tag],
                                                  "stop_after_first": True}}  # fmt: skip
    state = compiler.compile(StructuredOutput("structural_tag", spec))  # type: ignore[arg-type]
    v = len(tokenizer)
    assert len(allowed(state, [], v)) > v // 2  # free text
    state.advance(tokenizer.encode("Thanks for waiting <call>"))
    assert tokenizer.decode(state.forced_tokens()) == '{"urgency":"'
    state.advance(tokenizer.encode('{"urgency":"low"}</call>'))
    assert allowed(state, [], v) == [tokenizer.eos_token_id]  # stop_after_first: the reply ends


def test_legacy_structural_tag_format(compiler: GrammarCompiler, tokenizer: Any) -> None:
    spec = {"type": "structural_tag", "triggers": ["<f="],
            "structures": [{"begin": "<f=x>", "schema": {"type": "object"}, "end": "</f>"}]}  # fmt: skip
    state = compiler.compile(StructuredOutput("structural_tag", spec))  # type: ignore[arg-type]
    state.advance(tokenizer.encode("ok <f=x>"))
    assert tokenizer.decode(state.forced_tokens())[:1] == "{"


def test_a_special_token_trigger_is_matched_as_that_token(compiler: GrammarCompiler, tokenizer: Any) -> None:
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token of the tiny tokenizer
    call = {"type": "object", "properties": {"urgency": {"enum": ["low"]}}, "required": ["urgency"]}
    tag = {"begin": "<|im_start|>", "content": {"type": "json_schema", "json_schema": call}, "end": "\n"}
    spec = {"format": {"type": "triggered_tags", "triggers": ["<|im_start|>"], "tags": [{"type": "tag", **tag}]}}
    state = compiler.compile(StructuredOutput("structural_tag", spec))  # type: ignore[arg-type]
    text = tokenizer.encode("Hello")
    rows = state.allowed_rows([[], text, [*text, start]], len(tokenizer))
    assert rows[0, start] and rows[1, start]  # free text may open the span with the token itself
    state.advance([*text, start])
    assert tokenizer.decode(state.forced_tokens()).startswith('{"urgency":"low"')


def test_prefetched_rows_equal_rows_computed_on_demand(compiler: GrammarCompiler, tokenizer: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    state = schema_state(compiler)
    answer = tokenizer.encode(ANSWER)
    tree = build_tree([answer[:4], [*answer[:2], tokenizer.encode("x")[0]]])
    paths = [[]] + [[tree.token(r) for r in tree.path_to(row)] for row in range(1, tree.num_nodes + 1)]
    v = len(tokenizer) + 8
    expected = state.allowed_rows(paths, v)
    with ThreadPoolExecutor(1) as pool:
        used = state.stats.num_prefetched_rows
        state.prefetch(tree, v, pool)
        assert torch.equal(state.allowed_rows(paths, v), expected)
        assert state.stats.num_prefetched_rows == used + len(paths)
        state.prefetch(tree, v, pool)  # other paths than prefetched: computed afresh
        assert torch.equal(state.allowed_rows(paths[:2], v), expected[:2])
        assert state.stats.num_prefetched_rows == used + len(paths)
        state.prefetch(None, v, pool)  # never asked for: the next change of state waits for it first
        state.advance(answer[:1])
    assert torch.equal(state.allowed_rows([[]], v), expected[1:2])


def test_a_dict_schema_keeps_its_property_order() -> None:
    # The order properties are declared in is the order they are generated in: never sorted.
    schema = {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}}}
    assert list(json.loads(StructuredOutput("json_schema", schema).spec)["properties"]) == ["zeta", "alpha"]  # type: ignore[arg-type]
