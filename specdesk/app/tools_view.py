"""How tool calls look in the chat: a proposed call and its result as titled bubbles (Gradio's "thought"
messages, whose title renders as Markdown), the arguments and results as code. Pure functions of records.

Everything here is model text (a call's name and arguments) or a tool's output built from database rows
the customer may have typed: titles are escaped as customer text, bodies go through the same sanitizer as
drafted replies (a JSON body inside a fence no content can close).
"""

from __future__ import annotations

import json
from typing import Any

from specdesk.app.safe_markdown import clean_model_markdown, escape_customer_text
from specdesk.db import ConversationRecord, MessageRecord, MessageStatus, Role
from specdesk.engine.tool_calls import CALL_BEGIN

_ANSWER_NOTE = {MessageStatus.COMPLETE: "ran", MessageStatus.REJECTED: "rejected"}


def pretty_json(text: str) -> str:
    """JSON text indented for reading (as it came when it is not JSON)."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def code_block(text: str) -> str:
    """`text` shown verbatim as a JSON code block, whatever backticks or markup it holds."""
    return clean_model_markdown(f"```json\n{pretty_json(text)}\n```")


def call_facts(conversation: ConversationRecord | None) -> tuple[dict[str, str], dict[str, MessageStatus]]:
    """(call id → function name, call id → how it was answered) over the whole conversation."""
    names: dict[str, str] = {}
    answers: dict[str, MessageStatus] = {}
    for message in conversation.messages if conversation else ():
        for call in message.tool_calls or ():
            names[str(call.get("id"))] = str((call.get("function") or {}).get("name", ""))
        if message.role is Role.TOOL and message.tool_call_id:
            answers[message.tool_call_id] = message.status
    return names, answers


def bubbles(
    message: MessageRecord, names: dict[str, str], answers: dict[str, MessageStatus], *, waiting: str | None = None
) -> list[dict[str, Any]]:
    """The chat bubbles of a reply that proposes calls (its text, then one per call) or of a tool message.
    `waiting`: the id of the call whose card is open under the chat."""
    if message.role is Role.TOOL:
        name = escape_customer_text(names.get(message.tool_call_id or "", "a tool"))
        if message.status is MessageStatus.REJECTED:
            return [_titled(f"✕ {name} rejected by the agent", "*Not run: the reply continues without it.*")]
        return [_titled(f"📋 Result of {name}", code_block(message.content))]
    out: list[dict[str, Any]] = []
    if message.content.strip():
        out.append({"role": "assistant", "content": clean_model_markdown(message.content)})
    for call in message.tool_calls or ():
        call_id = str(call.get("id"))
        fn = call.get("function") or {}
        answer = answers.get(call_id)
        note = _ANSWER_NOTE.get(answer, "") if answer else ("waiting for you" if call_id == waiting else "not run")
        title = f"🛠 Tool call · {escape_customer_text(str(fn.get('name', '')))} · {note}"
        out.append(_titled(title, code_block(str(fn.get("arguments", "")))))
    return out


def live_call(text: str) -> dict[str, Any] | None:
    """A streaming reply that is writing a tool call (call JSON, or text then a <tool_call> tag) as one card
    with what came before; None for plain text."""
    head, tag, call = text.partition(CALL_BEGIN)
    if not tag:
        if not text.lstrip().startswith('{"name"'):
            return None
        head, call = "", text
    before = f"{clean_model_markdown(head.strip())}\n\n" if head.strip() else ""
    body = clean_model_markdown(f"```json\n{call.strip()}\n```")
    return _titled("🛠 Drafting a tool call…", before + body)


def _titled(title: str, content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "metadata": {"title": title}}
