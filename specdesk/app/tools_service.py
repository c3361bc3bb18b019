"""The chat service's tool turns: a persona's tools in the prompt and the grammar, the calls a reply
proposes split out and stored, and the agent's Run / Reject continuing the reply.

A mixin of ChatService (app/chat_service.py), which calls `tool_params`, `prompt_messages` and
`split_reply` from its turn; `run_tool_call` and `reject_tool_call` are what the console's tool card does.
The flow, all stored with the conversation:

    customer message ─► draft (the persona's tool_choice) ─► reply with a call ─► card in the console
      Run    ─► the tool runs ─► "tool" message with its result ─► a new draft continues ("auto")
      Reject ─► "tool" message saying it never ran (status rejected) ─► a new draft without tools ("none")
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import TYPE_CHECKING, Any

from specdesk import prompts
from specdesk.app.tools import PendingCall, ToolBox, parse_arguments, pending_call
from specdesk.app.turns import TurnState, TurnStream, TurnUpdate
from specdesk.db import ChatRepository, ConversationRecord, MessageStatus, Role
from specdesk.engine import SamplingParams, tool_calls

# What the model reads instead of a result when the agent rejects a call.
REJECTED_RESULT = json.dumps(
    {"error": "The agent rejected this call, so it did not run. Answer the customer without its result."}
)
ToolMode = str  # "json": the reply is call JSON (tool_choice required or named); "tagged": text with calls


class ToolTurns:
    """Tool calls in ChatService's turns (see the module docstring)."""

    tools: ToolBox
    repository: ChatRepository
    _tool_lock: threading.Lock

    if TYPE_CHECKING:

        def _check_idle(self, conversation_id: int, agent: str | None) -> None: ...
        def _stream_turn(self, conversation_id: int, params: SamplingParams) -> TurnStream: ...
        def sampling_params(self, **overrides: Any) -> SamplingParams: ...
        def prompt_variables(self, conversation: ConversationRecord | None) -> prompts.PromptVariables: ...

    # ---- inside a turn ---------------------------------------------------------------------------------
    def tool_params(
        self, conversation: ConversationRecord, params: SamplingParams
    ) -> tuple[SamplingParams, ToolMode | None]:
        """`params` with the grammar of the persona's tool choice for this draft, and how to read the reply
        (None: the persona has no tools, or the caller brought its own grammar)."""
        spec = self.tools.for_persona(conversation.persona)
        if spec is None or params.structured_output is not None:
            return params, None
        answered = [m for m in conversation.messages if m.status is not MessageStatus.PENDING][-1:]
        if answered and answered[0].role is Role.TOOL:  # continuing after the agent ran or rejected a call
            choice = "none" if answered[0].status is MessageStatus.REJECTED else "auto"
        else:
            choice = spec.tool_choice
        structured = tool_calls.structured_output(list(spec.functions), choice, parallel_tool_calls=False)
        mode = "json" if choice not in ("auto", "none") else "tagged"
        return dataclasses.replace(params, structured_output=structured), mode

    def prompt_messages(self, conversation: ConversationRecord) -> list[dict[str, str]]:
        """System prompt + history; with tools, their section joins the system prompt and earlier calls and
        results render back as the model wrote and read them (engine/tool_calls.prompt_messages)."""
        variables = self.prompt_variables(conversation)
        spec = self.tools.for_persona(conversation.persona)
        if spec is None:
            return prompts.build_messages(conversation.persona, conversation.history(), variables=variables)
        system = prompts.build_messages(conversation.persona, [], variables=variables)
        return tool_calls.prompt_messages([*system, *conversation.tool_history()], list(spec.functions))

    @staticmethod
    def split_reply(final: TurnUpdate, mode: ToolMode | None) -> tuple[str, list[dict[str, Any]] | None]:
        """(text to store, the calls it proposes in OpenAI's shape). Only a complete reply whose every call
        has a JSON object for arguments proposes calls; anything else is kept as the text it is."""
        if mode is None or final.state is not TurnState.COMPLETE:
            return final.text, None
        content, calls = tool_calls.parse_reply(final.text, json_mode=mode == "json")
        if not calls or not all(_is_object(c.arguments) for c in calls):
            return final.text, None
        return content, [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]

    # ---- the agent's decision ----------------------------------------------------------------------------
    def run_tool_call(
        self, conversation_id: int, call_id: str, arguments: str | None = None, *, agent: str | None = None
    ) -> TurnStream | None:
        """Run the waiting call `call_id` (with `arguments`, JSON text, when the agent edited them), store its
        result, and return the stream of the reply that continues (None while another call still waits).

        ValueError (arguments that do not fit the function, a call no longer waiting, a reply running) and
        NotFoundError come before anything runs or is stored."""
        self._check_idle(conversation_id, agent)
        with self._tool_lock:  # two tabs pressing Run at once: the tool runs once
            conversation = self.repository.get_conversation(conversation_id, agent=agent)
            call = _waiting(conversation, call_id)
            spec = self.tools.for_persona(conversation.persona)
            text = call.arguments if arguments is None else arguments
            args = parse_arguments(text, spec.function(call.name) if spec else None)
            edited = None if _same_json(text, call.arguments) else json.dumps(args, ensure_ascii=False)
            result = self.tools.run(call.name, args, conversation_id, agent)
            self.tools.repository.add_tool_result(conversation_id, call_id, result, arguments=edited, agent=agent)
        return self._continue(conversation_id)

    def reject_tool_call(self, conversation_id: int, call_id: str, *, agent: str | None = None) -> TurnStream | None:
        """Store that the agent rejected the waiting call; return the stream of the reply that answers
        without it (None while another call still waits)."""
        self._check_idle(conversation_id, agent)
        with self._tool_lock:
            _waiting(self.repository.get_conversation(conversation_id, agent=agent), call_id)
            self.tools.repository.add_tool_result(conversation_id, call_id, REJECTED_RESULT, rejected=True, agent=agent)
        return self._continue(conversation_id)

    def _continue(self, conversation_id: int) -> TurnStream | None:
        if pending_call(self.repository.get_conversation(conversation_id)) is not None:
            return None
        return self._stream_turn(conversation_id, self.sampling_params())


def _waiting(conversation: ConversationRecord, call_id: str) -> PendingCall:
    call = pending_call(conversation)
    if call is None or call.call_id != call_id:
        raise ValueError("this tool call is no longer waiting: it was run or rejected, or the customer wrote since")
    return call


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _same_json(a: str, b: str) -> bool:
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return a == b
