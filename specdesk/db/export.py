"""Export a ConversationRecord as a JSON-ready dict or a Markdown transcript (no SQL here).

Exports are deterministic (no "exported at" stamp) so the same conversation always exports the same.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from specdesk.db.records import ConversationRecord, FeedbackRecord, MessageRecord, MessageStatus, Role

EXPORT_FORMAT = "specdesk.conversation"
EXPORT_VERSION = 2  # 2: messages carry tool_calls and tool_call_id; role "tool"

_ROLE_LABELS = {Role.SYSTEM: "System", Role.USER: "Customer", Role.ASSISTANT: "Agent", Role.TOOL: "Tool result"}
# A Markdown image or raw HTML tag in customer text would make a viewer fetch a URL of the customer's
# choosing (data exfiltration); export them as inert text.
_IMAGE = re.compile(r"!\[")
_HTML_TAG = re.compile(r"<(?=[A-Za-z/!?])")


def to_dict(conversation: ConversationRecord) -> dict[str, Any]:
    """Plain JSON types only: ids, strings, ISO-8601 UTC times, metric numbers."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "conversation": {
            "id": conversation.id,
            "title": conversation.title,
            "customer_name": conversation.customer_name,
            "persona": conversation.persona,
            "status": conversation.status.value,
            "created_at": _iso(conversation.created_at),
            "updated_at": _iso(conversation.updated_at),
        },
        "messages": [_message_dict(m) for m in conversation.messages],
    }


def to_markdown(conversation: ConversationRecord) -> str:
    """A transcript an agent can paste into a ticket: header, then one section per message."""
    lines = [
        f"# {_inline(conversation.title)}",
        "",
        f"- Customer: {_inline(conversation.customer_name) or 'unknown'}",
        f"- Persona: {_inline(conversation.persona)}",
        f"- Status: {conversation.status.value}",
        f"- Created: {_human_time(conversation.created_at)}",
        f"- Conversation id: {conversation.id}",
    ]
    for message in conversation.messages:
        heading = f"## {_ROLE_LABELS[message.role]} · {_human_time(message.created_at)}"
        if message.status is not MessageStatus.COMPLETE:
            heading += f" ({message.status.value})"
        if message.tool_call_id:
            heading += f" · call {_inline(message.tool_call_id)}"
        body = _block(message.content) or ("" if message.tool_calls else "_(empty)_")
        lines += ["", heading, *(["", body] if body else [])]
        for call in message.tool_calls or ():
            fn = call.get("function") or {}
            name, arguments = _inline(str(fn.get("name", ""))), _inline(str(fn.get("arguments", "")))
            lines += ["", f"> Tool call {_inline(str(call.get('id', '')))}: {name} with arguments {arguments}"]
        if message.error:
            lines += ["", f"> Error: {_inline(message.error)}"]
        if message.metrics:
            metrics = " · ".join(f"{key}={_number(value)}" for key, value in message.metrics.items())
            lines += ["", f"_Metrics: {metrics}_"]
        if message.feedback is not None:
            lines += ["", _feedback_line(message.feedback)]
    return "\n".join(lines) + "\n"


def _message_dict(message: MessageRecord) -> dict[str, Any]:
    feedback = message.feedback
    return {
        "id": message.id,
        "position": message.position,
        "role": message.role.value,
        "content": message.content,
        "status": message.status.value,
        "error": message.error,
        "metrics": message.metrics,
        "created_at": _iso(message.created_at),
        "tool_calls": message.tool_calls,
        "tool_call_id": message.tool_call_id,
        "feedback": None
        if feedback is None
        else {
            "rating": feedback.rating,
            "comment": feedback.comment,
            "created_at": _iso(feedback.created_at),
            "updated_at": _iso(feedback.updated_at),
        },
    }


def _feedback_line(feedback: FeedbackRecord) -> str:
    verdict = "helpful (+1)" if feedback.rating > 0 else "not helpful (-1)"
    comment = f": {_inline(feedback.comment)}" if feedback.comment.strip() else ""
    return f"_Feedback: {verdict}{comment}_"


def _iso(value: datetime) -> str:
    return value.isoformat()


def _human_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _block(text: str) -> str:
    return _HTML_TAG.sub("&lt;", _IMAGE.sub(r"!\\[", text.strip()))


def _inline(text: str) -> str:
    return " ".join(_block(text).split())
