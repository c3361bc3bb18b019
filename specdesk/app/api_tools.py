"""`/v1/chat/completions` tools and structured output: OpenAI's `messages`, `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format` in, the prompt messages and the grammar out; tool-call events
out as OpenAI's message and stream shapes. The model-facing protocol itself is engine/tool_calls.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from specdesk.app.api_schemas import ApiError, ChatCompletionRequest
from specdesk.engine import tool_calls
from specdesk.engine.structured_output import StructuredOutput
from specdesk.engine.tool_calls import ToolCall, ToolCallParser, ToolEvent


@dataclass(frozen=True)
class ChatPlan:
    """What one chat request becomes: template messages, the grammar, and how to read the reply."""

    messages: list[dict[str, str]]
    structured: StructuredOutput | None
    parses_tools: bool  # the reply may hold tool calls
    json_mode: bool  # the whole reply is call JSON (tool_choice required or named)

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(json_mode=self.json_mode) if self.parses_tools else None


def chat_plan(req: ChatCompletionRequest) -> ChatPlan:
    """Translate the request, or 400 naming the field that is wrong."""
    try:
        functions = tool_calls.function_specs(req.tools or [])
    except ValueError as exc:
        raise ApiError(400, str(exc), param="tools") from None
    try:
        choice = tool_calls.tool_choice_name(req.tool_choice, functions)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="tool_choice") from None
    fmt = response_format(req.response_format)
    if fmt is not None and choice != "none":
        raise ApiError(400, "response_format cannot constrain a reply that may call tools", param="response_format")
    messages = _messages(req)
    if choice == "none":
        return ChatPlan(tool_calls.prompt_messages(messages, []), fmt, False, False)
    structured = tool_calls.structured_output(functions, choice, req.parallel_tool_calls)
    return ChatPlan(tool_calls.prompt_messages(messages, functions), structured, True, choice != "auto")


def response_format(fmt: dict[str, Any] | None) -> StructuredOutput | None:
    try:
        return tool_calls.response_format(fmt)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="response_format") from None


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as role/content(/tool_calls) dicts: text parts joined, `developer` read as `system`."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"message role {m.role!r} is not supported", param=f"messages.{i}.role")
        if isinstance(m.content, list):
            if any(p.get("type") != "text" for p in m.content):
                raise ApiError(400, "only text content parts are supported", param=f"messages.{i}.content")
            content = "".join(str(p.get("text", "")) for p in m.content)
        else:
            content = m.content or ""
        message: dict[str, Any] = {"role": role, "content": content}
        if m.tool_calls:
            if role != "assistant":
                raise ApiError(400, "only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls")
            message["tool_calls"] = [
                _checked_call(c, f"messages.{i}.tool_calls.{j}") for j, c in enumerate(m.tool_calls)
            ]
        out.append(message)
    return out


def _checked_call(call: dict[str, Any], param: str) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, "a tool call needs function.name", param=param)
    arguments = fn.get("arguments") or "{}"
    try:
        if not isinstance(json.loads(arguments) if isinstance(arguments, str) else arguments, dict):
            raise ValueError
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
        raise ApiError(400, "a tool call's function.arguments must be a JSON object", param=param) from None
    return call


def message_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Calls as an assistant message's `tool_calls`."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def delta_tool_call(event: ToolEvent) -> dict[str, Any]:
    """A streamed `delta.tool_calls` item: a call's start carries id, type and name (arguments ""), each
    later item an arguments fragment of the call at `index`."""
    if event.kind == "call":
        return {
            "index": event.index, "id": event.call_id, "type": "function",
            "function": {"name": event.name, "arguments": ""},
        }  # fmt: skip
    return {"index": event.index, "function": {"arguments": event.text}}
