"""Persona tools: the functions a persona's drafts may call, declared in ``tools/<persona>.json``.

A tools file sits beside the personas and is edited without touching Python::

    {
      "tool_choice": "auto",
      "tools": [
        {"type": "function", "function": {"name": "lookup_order", "description": "...",
                                          "parameters": {"type": "object", "properties": {...}}}}
      ]
    }

``tools`` are OpenAI-style function declarations (engine/tool_calls.py checks them as `/v1` does).
``tool_choice`` decides how a draft answering the customer may use them: "auto" (the model decides),
"required" (the draft is a call), a function's name (a call of that function) or "none". A draft that
continues after a tool result is always "auto"; after a rejected call, "none". A persona without a file has
no tools. Every problem in a file is a ValueError naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from specdesk.engine import tool_calls
from specdesk.prompts.loader import PROMPTS_DIR

TOOLS_DIR = PROMPTS_DIR / "tools"
_KEYS = {"tool_choice", "tools"}


@dataclass(frozen=True)
class PersonaTools:
    """One persona's tools: the checked `function` objects and the tool choice for a customer's turn."""

    persona: str
    functions: tuple[dict[str, Any], ...]
    tool_choice: str

    def function(self, name: str) -> dict[str, Any] | None:
        return next((f for f in self.functions if f["name"] == name), None)

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]


def load_persona_tools(persona: str, tools_dir: Path | None = None) -> PersonaTools | None:
    """`persona`'s tools, or None when it declares none (ValueError when its file is broken)."""
    path = (tools_dir or TOOLS_DIR) / f"{persona}.json"
    if "/" in persona or "\\" in persona or not path.is_file():
        return None
    return _load(path, persona)


def load_all_tools(tools_dir: Path | None = None, personas: set[str] | None = None) -> dict[str, PersonaTools]:
    """Every tools file of a folder, checked now (so a broken file stops the start, not a turn).

    `personas`: the known persona keys; a tools file for any other persona is an error."""
    out: dict[str, PersonaTools] = {}
    for path in sorted((tools_dir or TOOLS_DIR).glob("*.json")):
        if personas is not None and path.stem not in personas:
            raise ValueError(f"{path}: there is no persona {path.stem!r} (personas/{path.stem}.txt) to give tools to")
        out[path.stem] = _load(path, path.stem)
    return out


@cache
def _load(path: Path, persona: str) -> PersonaTools:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tools"), list) or not data["tools"]:
        raise ValueError(f'{path}: must be a JSON object with a non-empty "tools" list')
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_KEYS))}")
    try:
        functions = tool_calls.function_specs(data["tools"])
        for i, fn in enumerate(functions):
            _check_parameters(fn["parameters"], f"tools[{i}].function.parameters")
        choice = tool_calls.tool_choice_name(_choice(data.get("tool_choice", "auto")), functions)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return PersonaTools(persona, tuple(functions), choice)


def _choice(value: object) -> object:
    # A bare function name is accepted as well as OpenAI's {"type": "function", "function": {"name": ...}}.
    if isinstance(value, str) and value not in ("none", "auto", "required"):
        return {"type": "function", "function": {"name": value}}
    return value


def _check_parameters(schema: dict[str, Any], where: str) -> None:
    """The parameters are an object schema whose `required` names declared properties."""
    if schema.get("type", "object") != "object":
        raise ValueError(f"{where}.type must be 'object', got {schema.get('type')!r}")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
        raise ValueError(f"{where}.properties must map names to JSON schemas")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(name not in properties for name in required):
        raise ValueError(f"{where}.required must list declared properties, got {required!r}")
