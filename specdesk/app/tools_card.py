"""The console's tool-call card: what it shows for the call waiting in a conversation (or that it hides)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from specdesk.app.console_view import ConsoleView
from specdesk.app.safe_markdown import escape_customer_text
from specdesk.app.tools import pending_call
from specdesk.app.tools_view import pretty_json
from specdesk.db import ConversationRecord

CARD_HELP = "**Run** it as it is, **edit its arguments** first, or **reject** it: the reply then continues."


def tool_card(v: ConsoleView, conversation: ConversationRecord | None) -> dict[Any, Any]:
    """Updates for the card: shown with the waiting call's name and arguments (read-only until the agent
    chooses to edit them), hidden when nothing waits."""
    call = pending_call(conversation) if conversation is not None else None
    if call is None:
        return {v.tool_card: gr.Group(visible=False), v.tool_call_id: None}
    return {
        v.tool_card: gr.Group(visible=True),
        v.tool_call_id: call.call_id,
        v.tool_title: f"#### 🛠 The draft calls **{escape_customer_text(call.name)}**\n{CARD_HELP}",
        v.tool_args: gr.Code(value=pretty_json(call.arguments), interactive=False),
    }
