"""Persona tool files (prompts/tools/<persona>.json): the shipped ones load, broken ones fail with the file
and the field named, and the console refuses to start with a declared tool it cannot run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from specdesk.app.tools import ToolBox, parse_arguments
from specdesk.db import make_engine
from specdesk.db.tool_repository import ToolRepository
from specdesk.prompts.tools import load_all_tools, load_persona_tools

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "parameters": {
            "type": "object",
            "properties": {"order_number": {"type": "string"}, "priority": {"type": "string", "enum": ["a", "b"]}},
            "required": ["order_number"],
            "additionalProperties": False,
        },
    },
}


def _write(folder: Path, persona: str, body: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{persona}.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body), encoding="utf-8")
    return path


def test_the_shipped_tools_load() -> None:
    shipped = load_all_tools()
    assert set(shipped) == {"retail"}
    retail = shipped["retail"]
    assert retail.names == ["lookup_order", "create_ticket", "escalate_to_human"] and retail.tool_choice == "auto"
    assert load_persona_tools("general") is None and load_persona_tools("../personas/retail") is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"tools": []}, 'non-empty "tools" list'),
        ({"tools": [LOOKUP], "extra": 1}, "unknown key"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, r"tools\[0\].function.name"),
        ({"tools": [LOOKUP, LOOKUP]}, "declared twice"),
        ({"tools": [LOOKUP], "tool_choice": "create_ticket"}, "not among the tools"),
        ({"tools": [LOOKUP], "tool_choice": 3}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            r"parameters.type must be 'object'",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": ["x"]}}}]},
            r"required must list declared properties",
        ),
    ],
)
def test_a_broken_file_names_itself_and_the_field(tmp_path: Path, body: Any, message: str) -> None:
    path = _write(tmp_path, "retail", body)
    with pytest.raises(ValueError, match=message) as raised:
        load_all_tools(tmp_path)
    assert str(path) in str(raised.value)


def test_a_function_name_and_required_choice(tmp_path: Path) -> None:
    _write(tmp_path / "a", "retail", {"tools": [LOOKUP], "tool_choice": "lookup_order"})
    assert load_all_tools(tmp_path / "a")["retail"].tool_choice == "lookup_order"
    _write(tmp_path / "b", "retail", {"tools": [LOOKUP], "tool_choice": "required"})
    assert load_all_tools(tmp_path / "b")["retail"].tool_choice == "required"


def test_the_toolbox_refuses_unknown_personas_and_unimplemented_tools(tmp_path: Path) -> None:
    repository = ToolRepository(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    _write(tmp_path / "a", "nobody", {"tools": [LOOKUP]})
    with pytest.raises(ValueError, match="no persona 'nobody'"):
        ToolBox(repository, tmp_path / "a")
    unknown = {"type": "function", "function": {"name": "launch_rocket"}}
    _write(tmp_path / "b", "retail", {"tools": [unknown]})
    with pytest.raises(ValueError, match="no implementation: \\['launch_rocket'\\]"):
        ToolBox(repository, tmp_path / "b")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ("{}", "missing argument.*order_number"),
        ('{"order_number": "NW-1", "x": 1}', "unknown argument.*x"),
        ('{"order_number": 12}', "'order_number' must be of type string"),
        ('{"order_number": "NW-1", "priority": "z"}', "must be one of a, b"),
    ],
)
def test_arguments_are_checked_against_the_function(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_arguments(text, LOOKUP["function"])  # type: ignore[arg-type]
    assert parse_arguments('{"order_number": "NW-1"}', LOOKUP["function"]) == {"order_number": "NW-1"}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not declare"):
        parse_arguments("{}", None)
