"""Persona tools in the console: which tools a conversation's persona declares, the call waiting for the
agent in a conversation, checking a call's arguments, and running it (app/tools_demo.py).

The model-facing protocol (prompt section, grammar, parsing) is engine/tool_calls.py; the files are
prompts/tools/<persona>.json (prompts/tools.py); results are stored by db/tool_repository.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdesk import prompts
from specdesk.app.tools_demo import TOOLS, Tool, ToolContext
from specdesk.db import ConversationRecord, MessageStatus, Role
from specdesk.db.tool_repository import ToolRepository
from specdesk.prompts.tools import PersonaTools, load_all_tools

_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list,
}  # fmt: skip
SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class PendingCall:
    """A proposed call the agent has not run or rejected yet (the first of its reply's)."""

    message_id: int
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolBox:
    """Every persona's tools, loaded and checked at start, and the implementations that run them."""

    def __init__(
        self, repository: ToolRepository, tools_dir: Path | None = None, implementations: dict[str, Tool] | None = None
    ) -> None:
        self.repository = repository
        self.implementations = TOOLS if implementations is None else implementations
        self.personas = load_all_tools(tools_dir, {p.key for p in prompts.list_personas()})
        for spec in self.personas.values():
            missing = [name for name in spec.names if name not in self.implementations]
            if missing:
                raise ValueError(f"persona {spec.persona!r} declares tools with no implementation: {missing}")

    def for_persona(self, persona: str) -> PersonaTools | None:
        return self.personas.get(persona)

    def run(self, name: str, arguments: dict[str, Any], conversation_id: int, agent: str | None) -> str:
        """Run a checked call; its result as the JSON text the model reads back."""
        try:
            result = self.implementations[name](arguments, ToolContext(self.repository, conversation_id, agent))
        except ValueError as exc:  # arguments the database refuses (too long, broken text)
            result = {"error": str(exc)}
        return json.dumps(result, ensure_ascii=False)


def pending_call(conversation: ConversationRecord) -> PendingCall | None:
    """The call waiting for the agent: one of the last reply's calls not yet answered, while nothing but tool
    results came after that reply (once the customer writes again, an unanswered call lapses)."""
    answered: set[str | None] = set()
    for message in reversed(conversation.messages):
        if message.role is Role.TOOL:
            answered.add(message.tool_call_id)
            continue
        if message.role is not Role.ASSISTANT or message.status is not MessageStatus.COMPLETE:
            return None
        for call in message.tool_calls or ():
            if call.get("id") not in answered:
                fn = call.get("function") or {}
                return PendingCall(message.id, str(call["id"]), str(fn.get("name", "")), str(fn.get("arguments", "")))
        return None
    return None


def parse_arguments(text: str, function: dict[str, Any] | None) -> dict[str, Any]:
    """The call's arguments as an object, checked against the function's parameters (ValueError saying what
    is wrong): valid JSON, an object, required properties present, no undeclared ones when the schema says
    so, and each declared property of its type (and among its enum)."""
    if function is None:
        raise ValueError("the model called a function this persona does not declare")
    try:
        args = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValueError(f"the arguments are not valid JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ValueError("the arguments must be a JSON object")
    schema = function["parameters"]
    properties: dict[str, Any] = schema.get("properties", {})
    missing = [name for name in schema.get("required", []) if name not in args]
    if missing:
        raise ValueError(f"missing argument(s): {', '.join(missing)}")
    extra = [name for name in args if name not in properties]
    if extra and schema.get("additionalProperties") is False:
        raise ValueError(f"unknown argument(s): {', '.join(extra)}")
    for name, value in args.items():
        prop = properties.get(name, {})
        expected = _JSON_TYPES.get(prop.get("type", ""))
        if expected is not None and (
            not isinstance(value, expected) or (isinstance(value, bool) and prop["type"] != "boolean")
        ):
            raise ValueError(f"argument {name!r} must be of type {prop['type']}")
        if "enum" in prop and value not in prop["enum"]:
            raise ValueError(f"argument {name!r} must be one of {', '.join(map(str, prop['enum']))}")
    return args
