"""A structural tag (free text in which a trigger opens a constrained span, e.g. a tool call) as a Lark grammar
for llguidance.

The request carries the tag in xgrammar's format, the one OpenAI-style servers (vLLM, SGLang) accept, so a
client can send the same object to any of them:

    {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool_call>"],
        "tags": [{"type": "tag", "begin": "<tool_call>\\n", "content": {"type": "json_schema", "json_schema": {..}},
                  "end": "\\n</tool_call>"}, ...],
        "at_least_one": false, "stop_after_first": false}}

(also a lone "tag", "json_schema", "const_string", "sequence" or "or" as the format) and xgrammar's older
{"structures": [{"begin", "schema", "end"}], "triggers": [...]}. The free text before a trigger is a *lazy*
lexeme (llguidance's device for tool calling): it ends at the trigger's first occurrence, so once the model
writes the trigger it is inside the tag and the span's grammar holds. A trigger that is one special token of
the tokenizer is matched as that token (`<name>`), as text otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

TEXT = "TAG_TEXT: /(.|\\n)*/"
JSON_OPTIONS_KEY = "x-guidance"  # llguidance's per-schema JSON options


def structural_tag_to_lark(
    tag: dict[str, Any], is_special_token: Callable[[str], bool], json_options: dict[str, Any]
) -> str:
    """The Lark grammar (llguidance's dialect) of a structural tag; ValueError naming what is wrong.

    json_options: llguidance's JSON options for every json_schema span that sets none itself."""
    if not isinstance(tag, dict):
        raise ValueError(f"a structural tag must be a JSON object, got {type(tag).__name__}")
    if "structures" in tag:  # xgrammar's older format
        structures = tag["structures"]
        if not isinstance(structures, list):
            raise ValueError("structural tag 'structures' must be a list")
        tags = [{"type": "tag", "begin": s.get("begin"), "end": s.get("end", ""),
                 "content": {"type": "json_schema", "json_schema": s.get("schema")}} for s in structures]  # fmt: skip
        fmt: Any = {"type": "triggered_tags", "triggers": tag.get("triggers"), "tags": tags}
    else:
        fmt = tag.get("format")
    if not isinstance(fmt, dict):
        raise ValueError("a structural tag needs a 'format' object (or xgrammar's older 'structures')")
    lines: list[str] = []
    start = _Builder(lines, is_special_token, json_options).node(fmt)
    return "\n".join(["%llguidance {}", f"start: {start}", *lines, TEXT])


class _Builder:
    """Emits one Lark rule per format node; `node` returns the expression that stands for it."""

    def __init__(self, lines: list[str], is_special_token: Callable[[str], bool], json_options: dict[str, Any]) -> None:
        self.lines = lines
        self.json_options = json_options
        self.is_special_token = is_special_token
        self.num_rules = 0

    def rule(self, body: str, lazy: bool = False) -> str:
        name = f"r{self.num_rules}"
        self.num_rules += 1
        self.lines.append(f"{name}{'[lazy]' if lazy else ''}: {body}")
        return name

    def node(self, fmt: Any) -> str:
        if not isinstance(fmt, dict):
            raise ValueError(f"structural tag format must be an object, got {fmt!r:.80}")
        kind = fmt.get("type")
        if kind == "json_schema":
            schema = fmt.get("json_schema")
            if not isinstance(schema, dict | bool):
                raise ValueError("structural tag json_schema must be a JSON schema object")
            if isinstance(schema, dict) and JSON_OPTIONS_KEY not in schema:
                schema = {JSON_OPTIONS_KEY: self.json_options, **schema}
            return self.rule(f"%json {json.dumps(schema)}")
        if kind == "const_string":
            return _literal(_text(fmt.get("value"), "const_string value"))
        if kind == "tag":
            begin, end = _text(fmt.get("begin"), "tag begin"), _text(fmt.get("end", ""), "tag end")
            parts = [_literal(begin), self.node(fmt.get("content")), _literal(end)]
            return self.rule(" ".join(p for p in parts if p))
        if kind in ("sequence", "or"):
            elements = fmt.get("elements")
            if not isinstance(elements, list) or not elements:
                raise ValueError(f"structural tag {kind} needs a non-empty 'elements' list")
            return self.rule((" " if kind == "sequence" else " | ").join(self.node(e) for e in elements))
        if kind == "triggered_tags":
            return self.triggered(fmt)
        raise ValueError(f"unsupported structural tag format type {kind!r}")

    def triggered(self, fmt: dict[str, Any]) -> str:
        """Free text, where each trigger opens one of the tags that begin with it."""
        triggers, tags = fmt.get("triggers"), fmt.get("tags")
        if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
            raise ValueError("structural tag triggers must be a non-empty list of non-empty strings")
        if not isinstance(tags, list) or not tags:
            raise ValueError("structural tag triggered_tags needs a non-empty 'tags' list")
        opened: dict[str, str] = {}  # trigger -> the rule: free text up to and including it
        options = []
        for tag in tags:
            if not isinstance(tag, dict) or tag.get("type", "tag") != "tag":
                raise ValueError(f"triggered_tags holds tags only, got {tag!r:.80}")
            begin = _text(tag.get("begin"), "tag begin")
            trigger = next((t for t in triggers if begin.startswith(t)), None)
            if trigger is None:
                raise ValueError(f"tag begin {begin!r} starts with none of the triggers {triggers}")
            if trigger not in opened:
                # A special token is its own symbol (free text never holds one); text needs a lazy lexeme.
                special = self.is_special_token(trigger)
                body = f"TAG_TEXT {trigger}" if special else f"TAG_TEXT {_literal(trigger)}"
                opened[trigger] = self.rule(body, lazy=not special)
            rest = _literal(begin[len(trigger) :])
            content = self.node(tag.get("content"))
            end = _literal(_text(tag.get("end", ""), "tag end"))
            options.append(self.rule(" ".join(p for p in (opened[trigger], rest, content, end) if p)))
        one = "(" + " | ".join(options) + ")"
        text = self.rule("TAG_TEXT")
        if fmt.get("stop_after_first"):
            return one if fmt.get("at_least_one") else f"{one} | {text}"
        return f"{one}+ {text}" if fmt.get("at_least_one") else f"{one}* {text}"


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"structural tag {what} must be a string, got {value!r:.80}")
    return value


def _literal(text: str) -> str:
    """A Lark string literal ('' for nothing: the caller leaves it out)."""
    return json.dumps(text) if text else ""
