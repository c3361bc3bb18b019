"""What the tool-call card's buttons do (the card itself: app/tools_card.py).

Run and Reject are generation events: they store the agent's decision through the chat service and stream
the reply that continues, exactly as Send streams a draft (ConsoleActions._stream), so Stop, the busy state
and the final refresh behave the same. Edit only unlocks the arguments; Run checks them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from specdesk.app.console_actions import ConsoleActions, _agent, _message
from specdesk.app.tools_card import CARD_HELP
from specdesk.app.turns import TurnStream

Updates = dict[Any, Any]


class ToolActions:
    """The card's handlers, beside the console's own (ConsoleActions)."""

    def __init__(self, actions: ConsoleActions) -> None:
        self.actions = actions
        self.service = actions.service

    def run(
        self, call_id: str | None, arguments: str, conversation_id: int | None, search: str, request: gr.Request
    ) -> Iterator[Updates]:
        agent = _agent(request)
        yield from self._decide(
            conversation_id, call_id, search, agent,
            lambda cid, call: self.service.run_tool_call(cid, call, arguments, agent=agent),
        )  # fmt: skip

    def reject(
        self, call_id: str | None, conversation_id: int | None, search: str, request: gr.Request
    ) -> Iterator[Updates]:
        agent = _agent(request)
        yield from self._decide(
            conversation_id, call_id, search, agent,
            lambda cid, call: self.service.reject_tool_call(cid, call, agent=agent),
        )  # fmt: skip

    def edit(self) -> Updates:
        v = self.actions.v
        note = "✎ Editing the arguments (JSON): **Run** checks them against the function, then runs it."
        return {v.tool_args: gr.Code(interactive=True), v.tool_title: f"{note}\n\n{CARD_HELP}"}

    def _decide(
        self,
        conversation_id: int | None,
        call_id: str | None,
        search: str,
        agent: str | None,
        start: Callable[[int, str], TurnStream | None],
    ) -> Iterator[Updates]:
        a = self.actions
        if conversation_id is None or not call_id:
            gr.Warning("No tool call is waiting in this conversation.")
            return
        try:
            updates = start(conversation_id, call_id)
        except Exception as exc:  # arguments that do not fit, a call no longer waiting, the database failing
            gr.Warning(_message(exc))
            return
        if updates is None:  # another call of the same reply still waits for the agent
            yield {**a._view(conversation_id, search, agent), **a._busy(False)}
            return
        yield from a._stream(conversation_id, updates, search, agent, clear_message=False)
