"""Plain records and states the repository hands out.

Records are frozen dataclasses detached from any SQLAlchemy session, so the UI thread, the engine's
callback thread and the exporter can hold them without touching the database again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class ConversationStatus(str, enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Role(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"  # the customer
    ASSISTANT = "assistant"  # the agent's (LLM-drafted) reply
    TOOL = "tool"  # a tool call's result (or its rejection), answering one call of the reply before it


class MessageStatus(str, enum.Enum):
    COMPLETE = "complete"
    STOPPED = "stopped"  # the agent pressed stop or the client went away: content is partial
    ERROR = "error"
    PENDING = "pending"  # generation started, not finished (or the process died mid-stream)
    REJECTED = "rejected"  # a tool message: the agent rejected the call, which never ran


class NotFoundError(LookupError):
    """A conversation, message or feedback row that does not exist (message names the kind and id)."""

    def __init__(self, kind: str, row_id: int) -> None:
        super().__init__(f"{kind} {row_id} not found")
        self.kind = kind
        self.row_id = row_id


@dataclass(frozen=True)
class FeedbackRecord:
    message_id: int
    rating: int  # +1 or -1
    comment: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class MessageRecord:
    id: int
    conversation_id: int
    position: int  # 0-based order inside the conversation, unique per conversation
    role: Role
    content: str
    status: MessageStatus
    error: str | None
    # Per-turn engine metrics (ttft_s, tokens_per_s, tokens_per_step, num_cached_tokens, ...); JSON values.
    metrics: dict[str, Any] | None
    created_at: datetime
    feedback: FeedbackRecord | None = None
    # An assistant reply's proposed tool calls, in OpenAI's shape ({"id", "type", "function": {"name",
    # "arguments"}}, arguments as JSON text); a tool message's `tool_call_id` names the call it answers.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ConversationSummary:
    """One row of the conversation list: no messages, just enough to draw the sidebar."""

    id: int
    title: str
    customer_name: str
    persona: str
    status: ConversationStatus
    created_at: datetime
    updated_at: datetime
    num_messages: int
    agent: str | None = None  # the owning login name; None when created with login off


@dataclass(frozen=True)
class ConversationRecord:
    id: int
    title: str
    customer_name: str
    persona: str
    status: ConversationStatus
    created_at: datetime
    updated_at: datetime
    messages: tuple[MessageRecord, ...] = field(default_factory=tuple)  # ordered by position
    agent: str | None = None  # the owning login name; None when created with login off

    def history(self) -> list[dict[str, str]]:
        """Role/content dicts in order, ready for prompts.build_messages.

        Pending and failed replies are left out: the customer never saw them, so the model should not
        either. Stopped replies stay, because the partial text was shown. Tool calls and results are
        left out too (`tool_history` has them): only a persona with tools renders them.
        """
        return [
            {"role": m.role.value, "content": m.content}
            for m in self.messages
            if m.status not in _HIDDEN and m.role is not Role.TOOL and (m.content or not m.tool_calls)
        ]

    def tool_history(self) -> list[dict[str, Any]]:
        """The history in OpenAI's message shape for engine/tool_calls.prompt_messages: replies carry the
        calls that were answered (run or rejected) and each result is a "tool" message after them. A call
        never answered (the customer wrote again first) is left out, as is a reply left with nothing."""
        answered = {m.tool_call_id for m in self.messages if m.role is Role.TOOL}
        out: list[dict[str, Any]] = []
        for m in self.messages:
            if m.status in _HIDDEN:
                continue
            if m.role is Role.TOOL:
                out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
                continue
            calls = [c for c in m.tool_calls or () if c.get("id") in answered]
            if m.content or calls:
                out.append({"role": m.role.value, "content": m.content, **({"tool_calls": calls} if calls else {})})
        return out


_HIDDEN = (MessageStatus.PENDING, MessageStatus.ERROR)
