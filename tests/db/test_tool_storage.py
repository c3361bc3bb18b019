"""Tool calls in the database: a reply's proposed calls, their results and rejections as "tool" messages,
the demo orders (seeded by the migrations), tickets and handovers scoped to the agent, and the exports."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from specdesk.db import ChatRepository, MessageStatus, NotFoundError, Role, make_engine
from specdesk.db.demo_models import DEMO_ORDERS
from specdesk.db.export import to_markdown
from specdesk.db.migrations import MIGRATIONS, current_version, latest_version
from specdesk.db.tool_repository import ToolRepository


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _proposal(repo: ChatRepository, agent: str | None = None) -> int:
    """A conversation whose last reply proposes one lookup_order call."""
    conversation = repo.create_conversation(persona="retail", customer_name="Dana", agent=agent)
    repo.add_message(conversation.id, Role.USER, "Where is NW-1001?", agent=agent)
    reply = repo.start_assistant_message(conversation.id)
    calls = [_call("call_1", "lookup_order", {"order_number": "NW-1001"})]
    stored = repo.finish_assistant_message(reply.id, "Let me check.", tool_calls=calls)
    assert stored.tool_calls == calls
    return conversation.id


@pytest.fixture
def tools(engine: Engine) -> ToolRepository:
    return ToolRepository(engine)


def test_fresh_database_is_seeded_with_the_demo_orders(tools: ToolRepository, engine: Engine) -> None:
    assert current_version(engine) == latest_version(MIGRATIONS) >= 3
    order = tools.find_order(" nw-1001 ")
    assert order is not None and order["status"] == "shipped" and order["tracking_number"] == "JD014600003828"
    assert tools.find_order("NW-9999") is None
    unshipped = tools.find_order("NW-1003")
    assert unshipped is not None and unshipped["carrier"] is None


def test_an_older_database_gains_the_tool_columns_and_seeded_tables(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db_path) as connection:  # a version-2 file: no tool columns, no demo tables
        connection.executescript(
            """
            CREATE TABLE conversations (id INTEGER PRIMARY KEY, title VARCHAR(200) NOT NULL,
                created_at DATETIME, updated_at DATETIME, agent VARCHAR(200));
            CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL
                REFERENCES conversations(id) ON DELETE CASCADE, position INTEGER NOT NULL,
                role VARCHAR(16) NOT NULL, created_at DATETIME);
            CREATE TABLE schema_version (version INTEGER NOT NULL);
            INSERT INTO schema_version VALUES (2);
            INSERT INTO conversations (id, title, created_at, updated_at) VALUES
                (1, 'Old', '2026-01-01 10:00:00', '2026-01-01 10:00:00');
            INSERT INTO messages VALUES (1, 1, 0, 'user', '2026-01-01 10:00:00');
            """
        )
    engine = make_engine(f"sqlite:///{db_path}")
    assert current_version(engine) == latest_version(MIGRATIONS)
    old = ChatRepository(engine).get_conversation(1).messages[0]
    assert old.tool_calls is None and old.tool_call_id is None
    assert len(ToolRepository(engine).list_tickets()) == 0
    assert ToolRepository(engine).find_order("NW-1004") is not None
    make_engine(f"sqlite:///{db_path}")  # a second start seeds nothing twice
    assert int(sqlite3.connect(db_path).execute("SELECT count(*) FROM demo_orders").fetchone()[0]) == len(DEMO_ORDERS)


def test_a_result_answers_its_call_once_and_the_history_renders_it(repo: ChatRepository, tools: ToolRepository) -> None:
    conversation_id = _proposal(repo)
    edited = json.dumps({"order_number": "NW-1002"})
    result = tools.add_tool_result(conversation_id, "call_1", '{"status": "delayed"}', arguments=edited)
    assert (result.role, result.status, result.tool_call_id, result.position) == (
        Role.TOOL, MessageStatus.COMPLETE, "call_1", 2
    )  # fmt: skip
    with pytest.raises(ValueError, match="already answered"):
        tools.add_tool_result(conversation_id, "call_1", "{}")
    with pytest.raises(ValueError, match="not waiting"):
        tools.add_tool_result(conversation_id, "call_unknown", "{}")
    conversation = repo.get_conversation(conversation_id)
    # The stored call is the one that ran: the agent's edited arguments.
    assert conversation.messages[1].tool_calls == [_call("call_1", "lookup_order", {"order_number": "NW-1002"})]
    assert conversation.tool_history() == [
        {"role": "user", "content": "Where is NW-1001?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": conversation.messages[1].tool_calls},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "delayed"}'},
    ]
    # Plain history (a persona without tools) leaves tool messages out.
    assert [m["role"] for m in conversation.history()] == ["user", "assistant"]


def test_a_rejection_is_stored_and_an_unanswered_call_lapses(repo: ChatRepository, tools: ToolRepository) -> None:
    conversation_id = _proposal(repo)
    rejected = tools.add_tool_result(conversation_id, "call_1", '{"error": "rejected"}', rejected=True)
    assert rejected.status is MessageStatus.REJECTED
    lapsed = _proposal(repo)
    repo.add_message(lapsed, Role.USER, "Never mind, found it.")
    with pytest.raises(ValueError, match="moved on"):
        tools.add_tool_result(lapsed, "call_1", "{}")
    # A call never answered is not rendered back to the model; the reply's text still is.
    assert repo.get_conversation(lapsed).tool_history()[1] == {"role": "assistant", "content": "Let me check."}


def test_tickets_and_handovers_belong_to_the_agent(repo: ChatRepository, tools: ToolRepository) -> None:
    alice = _proposal(repo, agent="alice")
    ticket = tools.create_ticket(alice, "Carrier trace", "NW-1002 is late", "high", agent="alice")
    assert ticket["ticket_id"].startswith("T-") and ticket["status"] == "open"
    handover = tools.record_handover(alice, "chargeback mentioned", "high", agent="alice")
    assert handover["handover_id"].startswith("H-")
    with pytest.raises(NotFoundError):  # bob cannot file into alice's conversation
        tools.create_ticket(alice, "hijack", agent="bob")
    with pytest.raises(NotFoundError):
        tools.add_tool_result(alice, "call_1", "{}", agent="bob")
    assert [t["subject"] for t in tools.list_tickets(agent="alice")] == ["Carrier trace"]
    assert tools.list_tickets(agent="bob") == [] and tools.list_handovers(agent="bob") == []
    assert len(tools.list_handovers(conversation_id=alice)) == 1
    repo.delete_conversation(alice, agent="alice")  # its tickets and handovers go with it
    assert tools.list_tickets() == [] and tools.list_handovers() == []


def test_exports_carry_calls_and_results_inertly(repo: ChatRepository, tools: ToolRepository) -> None:
    conversation_id = _proposal(repo)
    tools.add_tool_result(conversation_id, "call_1", '{"note": "![x](https://evil.example/?q=1) <b>hi</b>"}')
    exported = repo.export_json(conversation_id)
    assert exported["version"] == 2
    reply, result = exported["messages"][1], exported["messages"][2]
    assert reply["tool_calls"][0]["function"]["name"] == "lookup_order" and reply["tool_call_id"] is None
    assert (result["role"], result["tool_call_id"], result["tool_calls"]) == ("tool", "call_1", None)
    markdown = to_markdown(repo.get_conversation(conversation_id))
    assert "Tool call call_1: lookup_order with arguments" in markdown and "NW-1001" in markdown
    assert "## Tool result" in markdown and "call call_1" in markdown
    assert "![x]" not in markdown and "<b>" not in markdown
