"""engine/tool_calls.py: prompt rendering, the grammar per tool_choice, and the incremental parser."""

from __future__ import annotations

import json

import pytest

from specdesk.engine import tool_calls
from specdesk.engine.tool_calls import ToolCallParser, ToolEvent, parse_reply

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order by its number.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
    },
}
ESCALATE = {"type": "function", "function": {"name": "escalate_to_human"}}
FUNCTIONS = tool_calls.function_specs([LOOKUP, ESCALATE])


def _feed_in_pieces(text: str, size: int, json_mode: bool = False) -> tuple[list[ToolEvent], ToolCallParser]:
    parser = ToolCallParser(json_mode=json_mode)
    events = [e for i in range(0, len(text), size) for e in parser.feed(text[i : i + size])]
    return events + parser.finish(), parser


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_parser_streams_text_then_name_then_arguments(size: int) -> None:
    # A closing tag inside an argument string (a customer's pasted text) is text, not the end of the call.
    args = {"order_id": '48{2}13 "quoted" </x> </tool_call>', "items": [1, {"a": "}"}]}
    text = f'Let me check.\n<tool_call>\n{{"name": "lookup_order", "arguments": {json.dumps(args)}}}\n</tool_call>'
    events, parser = _feed_in_pieces(text + "\nDone <tool", size)
    kinds = [e.kind for e in events]
    first_call = kinds.index("call")
    assert set(kinds[:first_call]) == {"content"} and "content" not in kinds[first_call : kinds.index("content", 1)]
    assert "".join(e.text for e in events if e.kind == "content") == "Let me check.\n\nDone <tool"
    assert json.loads("".join(e.text for e in events if e.kind == "arguments")) == args
    [call] = parser.calls
    assert call.name == "lookup_order" and json.loads(call.arguments) == args and call.id.startswith("call_")
    if size == 1:  # arguments arrive in fragments as they are written, not at the end
        assert kinds.count("arguments") > 10


def test_parser_json_mode_and_parallel_calls() -> None:
    text = '[{"name": "lookup_order", "arguments": {"order_id": "1"}}, {"name": "escalate_to_human", "arguments": {}}]'
    for size in (1, 7, 1000):
        events, parser = _feed_in_pieces(text, size, json_mode=True)
        assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
            ("lookup_order", {"order_id": "1"}), ("escalate_to_human", {}),
        ]  # fmt: skip
        assert [e.index for e in events if e.kind == "call"] == [0, 1]
        assert not [e for e in events if e.kind == "content"]


def test_parse_reply_edge_cases() -> None:
    # arguments before name: the call is read whole when it ends
    content, calls = parse_reply('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1})]
    # not a call at all: the text comes back as it was
    assert parse_reply("<tool_call>nope</tool_call> hi") == ("<tool_call>nope</tool_call> hi", [])
    # a stop string cut the closing tag: the call ends with the reply
    content, calls = parse_reply('ok <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')
    assert content == "ok" and json.loads(calls[0].arguments) == {"a": 1}


def test_prompt_messages_round_trip() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "7"}'}}
    messages = [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "Where is order 7?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"status": "shipped"}', "tool_call_id": "call_1"},
        {"role": "tool", "content": '{"eta": "Monday"}', "tool_call_id": "call_2"},
        {"role": "user", "content": "Thanks, and the refund?"},
    ]
    out = tool_calls.prompt_messages(messages, FUNCTIONS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("You are a support agent.\n\n# Tools") and '"lookup_order"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "7"}}\n</tool_call>'
    assert parse_reply(out[2]["content"])[1][0].arguments == '{"order_id": "7"}'
    assert out[3]["content"].count("<tool_response>") == 2 and out[3]["content"].endswith("\n\nThanks, and the refund?")
    assert tool_calls.prompt_messages(messages[:2], []) == messages[:2]
    # A reply left out (its call was never answered) would leave two customer turns in a row: one turn.
    lapsed = tool_calls.prompt_messages([messages[1], {"role": "user", "content": "Hello?"}], [])
    assert lapsed == [{"role": "user", "content": "Where is order 7?\n\nHello?"}]


def test_tool_choice_and_specs_are_checked() -> None:
    assert tool_calls.tool_choice_name(None, FUNCTIONS) == "auto"
    assert tool_calls.tool_choice_name(None, []) == "none"
    assert tool_calls.tool_choice_name({"type": "function", "function": {"name": "lookup_order"}}, FUNCTIONS) == (
        "lookup_order"
    )
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, {"type": "function"}):
        with pytest.raises(ValueError, match=r"^tool_choice"):
            tool_calls.tool_choice_name(bad, FUNCTIONS)
    for tools in ([{"type": "function", "function": {"name": "bad name"}}], [LOOKUP, LOOKUP], [{"type": "x"}]):
        with pytest.raises(ValueError, match=r"^tools"):
            tool_calls.function_specs(tools)


def test_every_tool_choice_compiles_with_xgrammar() -> None:
    xgr = pytest.importorskip("xgrammar")
    for choice, parallel in [("auto", True), ("auto", False), ("required", True), ("required", False),
                             ("lookup_order", True)]:  # fmt: skip
        so = tool_calls.structured_output(FUNCTIONS, choice, parallel)
        assert so is not None
        if so.kind == "structural_tag":
            xgr.Grammar.from_structural_tag(so.spec)
        else:
            xgr.Grammar.from_json_schema(so.spec)
    assert tool_calls.structured_output(FUNCTIONS, "none") is None
    named = json.loads(tool_calls.structured_output(FUNCTIONS, "lookup_order").spec)  # type: ignore[union-attr]
    assert named["properties"]["name"] == {"const": "lookup_order"}
    assert list(named["properties"]) == ["name", "arguments"]


@pytest.fixture(scope="module")
def compiler(tmp_path_factory: pytest.TempPathFactory) -> object:
    from transformers import AutoTokenizer

    from specdesk.engine.grammar.compiler import GrammarCompiler
    from tests.tiny_models import make_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model("qwen2", tmp_path_factory.mktemp("tc")))
    return GrammarCompiler(tokenizer, [tokenizer.eos_token_id])


_CALL = '{"name":"lookup_order","arguments":{"order_id":"48213"}}'


@pytest.mark.parametrize(
    ("choice", "parallel", "reply", "ok"),
    [
        ("auto", True, f"Let me look.\n<tool_call>\n{_CALL}\n</tool_call>", True),
        ("auto", True, "No call needed, thanks!", True),
        ("auto", True, '<tool_call>\n{"name":"refund","arguments":{}}\n</tool_call>', False),
        ("auto", False, f"<tool_call>\n{_CALL}\n</tool_call>", True),
        ("required", False, _CALL, True),
        ("required", True, f'[{_CALL},{{"name":"escalate_to_human","arguments":{{}}}}]', True),
        ("required", False, "Sure!", False),
        ("lookup_order", False, _CALL, True),
        ("lookup_order", False, '{"name":"escalate_to_human","arguments":{}}', False),
    ],
)
def test_the_engine_grammar_accepts_exactly_the_protocol(
    compiler: object, choice: str, parallel: bool, reply: str, ok: bool
) -> None:
    """The grammar each tool_choice builds, compiled by the engine's own compiler (engine/grammar/), takes
    the replies the parser reads and refuses the ones tool_choice rules out."""
    spec = tool_calls.structured_output(FUNCTIONS, choice, parallel)
    assert spec is not None
    state = compiler.compile(spec)  # type: ignore[attr-defined]
    tokens = [*compiler.tokenizer.encode(reply), *compiler.eos_token_ids]  # type: ignore[attr-defined]
    if not ok:
        with pytest.raises(ValueError, match="does not match the grammar"):
            state.advance(tokens)
        return
    state.advance(tokens)
    assert state.is_terminated
    _, calls = parse_reply(reply, json_mode=choice != "auto")
    assert (len(calls) > 0) == ("<tool_call>" in reply or choice != "auto")


def test_strict_json_schema_closes_every_object() -> None:
    inner = {"type": "object", "properties": {"b": {"type": "string"}}}
    schema = {"type": "object", "properties": {"a": inner, "l": {"type": "array", "items": inner}}}
    strict = tool_calls.response_format({"type": "json_schema", "json_schema": {"schema": schema, "strict": True}})
    assert strict is not None
    closed = json.loads(strict.spec)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["l"]["items"]["additionalProperties"] is False
    loose = tool_calls.response_format({"type": "json_schema", "json_schema": {"schema": schema}})
    assert loose is not None and json.loads(loose.spec) == schema  # not strict: the schema as given
    opened = {**schema, "additionalProperties": True}
    kept = tool_calls.response_format({"type": "json_schema", "json_schema": {"schema": opened, "strict": True}})
    assert kept is not None and json.loads(kept.spec)["additionalProperties"] is True  # it said otherwise
