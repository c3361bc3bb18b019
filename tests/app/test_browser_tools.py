"""A persona's tool call from the console, in headless Chromium: the draft proposes a call, the card shows
it, the agent runs (or edits, or rejects) it, the result and the continued reply appear, and a reload finds
everything stored.

The end-to-end test takes the real path: a retail persona whose tools file says tool_choice "required", so
the engine's grammar (engine/grammar/, through engine/tool_calls.structured_output) makes the first draft a
call; its argument schema (an order-number pattern) leaves the tiny random model only valid calls. Nothing is
injected into the page. The Edit and Reject test starts from a stored proposal, as a grammar-shaped draft
leaves it. Fixtures and helpers as in test_browser.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from specdesk.app.chat_service import ChatService
from specdesk.app.server import RunningServer
from specdesk.app.settings import Settings
from specdesk.app.tools import ToolBox
from specdesk.db import ChatRepository, MessageStatus, Role, make_engine
from specdesk.db.tool_repository import ToolRepository
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import tiny_console_llm
from tests.app.test_browser import ARTIFACTS, bot_text, open_console, page, server, type_and_press_enter
from tests.app.test_browser import pytestmark as browser_marks

pytestmark = browser_marks
__all__ = ["page", "server"]  # test_browser.py's fixtures, over this module's service

# Room for a whole call (the tiny tokenizer spends about a token per character); the reply after a tool
# result runs this long too (the tiny model never says EOS).
MAX_TOKENS = 160
REQUIRED_LOOKUP = {
    "tool_choice": "required",
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "lookup_order",
                "description": "Look up an order by its number.",
                "parameters": {
                    "type": "object",
                    "properties": {"order_number": {"type": "string", "pattern": "^NW-100[1-4]$"}},
                    "required": ["order_number"],
                    "additionalProperties": False,
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "create_ticket",
                "description": "Open a support ticket.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "subject": {"type": "string", "maxLength": 40},
                        "priority": {"type": "string", "enum": ["normal", "high"]},
                    },
                    "required": ["subject", "priority"],
                    "additionalProperties": False,
                },
            },
        },
    ],
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_console_llm(tmp_path_factory.mktemp("browser-tools"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def service(llm: LLM, tmp_path_factory: pytest.TempPathFactory) -> ChatService:
    tools_dir = tmp_path_factory.mktemp("tools")
    (tools_dir / "retail.json").write_text(json.dumps(REQUIRED_LOOKUP), encoding="utf-8")
    repository = ChatRepository(make_engine(f"sqlite:///{tmp_path_factory.mktemp('db') / 'specdesk.db'}"))
    toolbox = ToolBox(ToolRepository(repository.engine), tools_dir)
    settings = Settings(temperature=0.0, max_tokens=MAX_TOKENS)
    return ChatService(llm, repository, settings, tools=toolbox)


def pick_persona(page: Any, title: str) -> None:
    page.locator("#sd-sidebar").get_by_label("Persona for new conversations").click()
    page.get_by_role("option", name=title).click()


def wait_continued(page: Any, service: ChatService, conversation_id: int, num_messages: int) -> None:
    """Wait until the reply that continues after the agent's decision is stored and the page shows it done."""
    deadline = time.monotonic() + 60
    while True:
        messages = service.repository.get_conversation(conversation_id).messages
        stored = len(messages) == num_messages and messages[-1].status is MessageStatus.COMPLETE
        if stored and page.locator("#sd-send").is_visible() and page.locator("#sd-tool-run").is_hidden():
            break
        assert time.monotonic() < deadline, f"no continued reply: {[(m.role, m.status) for m in messages]}"
        time.sleep(0.05)
    page.locator("#sd-status").get_by_text("Reply ready").wait_for()


def titles(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#sd-chat .title").all_inner_texts()]


def test_a_required_tool_call_runs_from_the_console_end_to_end(
    page: Any, server: RunningServer, service: ChatService
) -> None:
    open_console(page, server.url)
    pick_persona(page, "Retail and online shop")
    type_and_press_enter(page, "Hi, where is my order NW-1001?")
    card = page.locator("#sd-tool-run")  # shown with the card (the Group repeats its id)
    card.wait_for(state="visible", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-tools-card.png"), full_page=True)
    summary = service.repository.list_conversations("NW-1001")[0]
    proposed = service.repository.get_conversation(summary.id).messages[1]
    assert proposed.tool_calls is not None and len(proposed.tool_calls) == 1  # the grammar made the draft a call
    name = proposed.tool_calls[0]["function"]["name"]
    arguments = json.loads(page.locator("#sd-tool-args .cm-content").inner_text())
    assert name in page.locator("#sd-tool-title").inner_text()
    assert arguments == json.loads(proposed.tool_calls[0]["function"]["arguments"])

    page.locator("#sd-tool-run").click()
    wait_continued(page, service, summary.id, 4)
    chat = page.locator("#sd-chat")
    chat.get_by_text(f"Result of {name}").wait_for()
    assert any(f"Tool call · {name} · ran" in t for t in titles(page))
    page.screenshot(path=str(ARTIFACTS / "browser-tools-ran.png"), full_page=True)

    messages = service.repository.get_conversation(summary.id).messages
    assert [(m.role, m.status) for m in messages] == [
        (Role.USER, MessageStatus.COMPLETE), (Role.ASSISTANT, MessageStatus.COMPLETE),
        (Role.TOOL, MessageStatus.COMPLETE), (Role.ASSISTANT, MessageStatus.COMPLETE),
    ]  # fmt: skip
    assert messages[2].tool_call_id == proposed.tool_calls[0]["id"] and "error" not in json.loads(messages[2].content)
    continued = messages[3]
    assert continued.metrics is not None and continued.metrics["num_generated_tokens"] > 0
    assert bot_text(page).strip(" ▍") != ""  # the continued reply is shown

    page.reload()  # everything is stored: reopen the conversation from the sidebar
    page.locator("#sd-conversations label").filter(has_text="where is my order NW-1001").click()
    chat.get_by_text(f"Result of {name}").wait_for()
    assert any(f"Tool call · {name} · ran" in t for t in titles(page)) and card.is_hidden()
    result_key = next(iter(json.loads(messages[2].content)))
    chat.get_by_text(f'"{result_key}"').first.wait_for(timeout=10_000)  # the stored result, shown again
    page.wait_for_timeout(1000)  # the reopened cards lay out before the screenshot
    page.screenshot(path=str(ARTIFACTS / "browser-tools-reopened.png"), full_page=True)


def _stored_proposal(service: ChatService, text: str, name: str, arguments: dict[str, Any]) -> int:
    repo = service.repository
    conversation = service.new_conversation("retail", "Dana")
    repo.rename_conversation(conversation.id, text)
    repo.add_message(conversation.id, Role.USER, text)
    reply = repo.start_assistant_message(conversation.id)
    call = {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    repo.finish_assistant_message(reply.id, "", tool_calls=[call])
    return conversation.id


def test_edit_arguments_then_run_and_reject_from_the_card(
    page: Any, server: RunningServer, service: ChatService
) -> None:
    edited_id = _stored_proposal(service, "The parcel arrived broken", "create_ticket",
                                 {"subject": "Broken", "priority": "normal"})  # fmt: skip
    rejected_id = _stored_proposal(service, "Please just tell me the policy", "lookup_order",
                                   {"order_number": "NW-1002"})  # fmt: skip
    open_console(page, server.url)
    page.locator("#sd-conversations label").filter(has_text="The parcel arrived broken").click()
    card = page.locator("#sd-tool-run")  # shown with the card (the Group repeats its id)
    card.wait_for(state="visible")
    assert any("Tool call · create_ticket · waiting for you" in t for t in titles(page))

    page.locator("#sd-tool-edit").click()
    editor = page.locator("#sd-tool-args .cm-content")
    page.wait_for_function("() => document.querySelector('#sd-tool-args .cm-content').contentEditable === 'true'")
    editor.click()
    page.keyboard.press("Control+A")
    # Typed whole (the editor closes brackets and quotes as they open, and steps over them as they close).
    page.keyboard.type('{"subject": "Broken"}', delay=5)  # no priority: refused, nothing stored
    page.locator("#sd-tool-run").click()
    page.get_by_text("missing argument(s): priority").first.wait_for()
    assert len(service.repository.get_conversation(edited_id).messages) == 2
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type('{"subject": "Broken mug, send photo", "priority": "high"}', delay=5)
    page.locator("#sd-tool-run").click()
    wait_continued(page, service, edited_id, 4)
    page.locator("#sd-chat").get_by_text("Result of create_ticket").wait_for()
    tickets = service.tools.repository.list_tickets(conversation_id=edited_id)
    assert [(t["subject"], t["priority"]) for t in tickets] == [("Broken mug, send photo", "high")]
    page.screenshot(path=str(ARTIFACTS / "browser-tools-edited.png"), full_page=True)

    page.locator("#sd-conversations label").filter(has_text="Please just tell me the policy").click()
    card.wait_for(state="visible")
    page.locator("#sd-tool-reject").click()
    wait_continued(page, service, rejected_id, 4)
    page.locator("#sd-chat").get_by_text("lookup_order rejected by the agent").wait_for()
    messages = service.repository.get_conversation(rejected_id).messages
    assert [(m.role, m.status) for m in messages][2:] == [
        (Role.TOOL, MessageStatus.REJECTED), (Role.ASSISTANT, MessageStatus.COMPLETE)
    ]  # fmt: skip
    deadline = time.monotonic() + 5
    while card.is_visible():
        assert time.monotonic() < deadline, "the card stayed after the call was rejected"
        time.sleep(0.05)
    page.screenshot(path=str(ARTIFACTS / "browser-tools-rejected.png"), full_page=True)
