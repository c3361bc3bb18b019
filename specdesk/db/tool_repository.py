"""ToolRepository: the SQL behind persona tools, beside ChatRepository and scoped the same way.

Two kinds of rows: a tool call's result (a "tool" message answering one call of the reply before it) and
the demo back office the tools act on (db/demo_models.py). Each method is one short write or read
transaction; given an ``agent``, another agent's conversation raises NotFoundError like a missing one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from specdesk.db.demo_models import DemoOrder, Handover, Ticket
from specdesk.db.models import Message
from specdesk.db.records import MessageRecord, MessageStatus, Role
from specdesk.db.repository import _check_text, _get_conversation, append_message
from specdesk.db.session import writer


class ToolRepository:
    """Tool results and the demo orders, tickets and handovers. Thread-safe (no session is kept)."""

    def __init__(self, engine: Engine) -> None:
        self._reader = sessionmaker(engine, expire_on_commit=False)
        self._writer = sessionmaker(writer(engine), expire_on_commit=False)

    # -- tool results --------------------------------------------------------------------------------

    def add_tool_result(
        self,
        conversation_id: int,
        call_id: str,
        content: str,
        *,
        rejected: bool = False,
        arguments: str | None = None,
        agent: str | None = None,
    ) -> MessageRecord:
        """Answer the call `call_id` of the conversation's last reply: its result (or, `rejected`, the note
        that it never ran) as a tool message. `arguments` (JSON text) replaces the call's arguments when the
        agent edited them, so the stored call is the one that ran. One transaction: a call is answered once.

        ValueError when the call is not waiting (already answered, or the customer wrote since)."""
        _check_text(content, "content")
        with self._writer.begin() as session:
            conversation = _get_conversation(session, conversation_id, agent)
            reply = _reply_with_call(conversation.messages, call_id)
            if reply is None:
                raise ValueError(f"tool call {call_id!r} is not waiting in this conversation")
            later = [m for m in conversation.messages if m.position > reply.position]
            if any(m.role is not Role.TOOL for m in later):
                raise ValueError("the conversation has moved on since this tool call was proposed")
            if any(m.tool_call_id == call_id for m in later):
                raise ValueError(f"tool call {call_id!r} was already answered")
            if arguments is not None:
                calls = [dict(c) for c in reply.tool_calls or ()]
                for i, call in enumerate(calls):
                    if call.get("id") == call_id:
                        calls[i] = {**call, "function": {**call["function"], "arguments": arguments}}
                reply.tool_calls = calls  # a new list: the JSON column sees the change
            status = MessageStatus.REJECTED if rejected else MessageStatus.COMPLETE
            return append_message(
                session, conversation_id, agent, role=Role.TOOL, content=content, status=status, tool_call_id=call_id
            )

    # -- the demo back office ----------------------------------------------------------------------

    def find_order(self, order_number: str) -> dict[str, Any] | None:
        """A demo order by its number (case and surrounding spaces ignored), or None."""
        number = _check_text(order_number, "order_number", 32).strip().upper()
        with self._reader() as session:
            row = session.scalars(select(DemoOrder).where(DemoOrder.order_number == number)).one_or_none()
            return None if row is None else row.as_dict()

    def create_ticket(
        self, conversation_id: int, subject: str, description: str = "", priority: str = "normal", *,
        agent: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Open a ticket for the conversation, owned by its agent."""
        row = Ticket(
            conversation_id=conversation_id, subject=_check_text(subject, "subject", 200),
            description=_check_text(description, "description"), priority=_check_text(priority, "priority", 16),
        )  # fmt: skip
        return self._add_owned(row, conversation_id, agent)

    def record_handover(
        self, conversation_id: int, reason: str, urgency: str = "normal", *, agent: str | None = None
    ) -> dict[str, Any]:
        """Hand the conversation over to a human team lead."""
        row = Handover(
            conversation_id=conversation_id, reason=_check_text(reason, "reason"),
            urgency=_check_text(urgency, "urgency", 16),
        )  # fmt: skip
        return self._add_owned(row, conversation_id, agent)

    def list_tickets(self, *, agent: str | None = None, conversation_id: int | None = None) -> list[dict[str, Any]]:
        return self._list(Ticket, agent, conversation_id)

    def list_handovers(self, *, agent: str | None = None, conversation_id: int | None = None) -> list[dict[str, Any]]:
        return self._list(Handover, agent, conversation_id)

    def _add_owned(self, row: Ticket | Handover, conversation_id: int, agent: str | None) -> dict[str, Any]:
        with self._writer.begin() as session:
            row.agent = _get_conversation(session, conversation_id, agent).agent
            session.add(row)
            session.flush()
            return row.as_dict()

    def _list(
        self, model: type[Ticket] | type[Handover], agent: str | None, conversation_id: int | None
    ) -> list[dict[str, Any]]:
        stmt = select(model).order_by(model.id)
        if agent is not None:
            stmt = stmt.where(model.agent == agent)
        if conversation_id is not None:
            stmt = stmt.where(model.conversation_id == conversation_id)
        with self._reader() as session:
            rows: list[Ticket | Handover] = list(session.scalars(stmt))
            return [{"conversation_id": row.conversation_id, **row.as_dict()} for row in rows]


def _reply_with_call(messages: list[Message], call_id: str) -> Message | None:
    for message in reversed(messages):
        if message.role is Role.ASSISTANT and any(c.get("id") == call_id for c in message.tool_calls or ()):
            return message
    return None
