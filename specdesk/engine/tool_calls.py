"""The model-facing tool-call protocol: tools into the prompt, a grammar per `tool_choice`, calls back out.

Shared by `/v1` (app/api_tools.py), `ChatSpecDesk` and later the console; plain data and text, no app code.

A call is written by the model in the Hermes / Qwen2.5 format, which many instruct models were tuned on:

    <tool_call>
    {"name": "lookup_order", "arguments": {"order_id": "48213"}}
    </tool_call>

Templates without tool support get the functions and this format in a system-prompt section
(`prompt_messages`); earlier calls and their results render back as that same text, so a round trip reads
to the model as it was written. `tool_choice` picks the grammar (`structured_output`):

    none        no tools in the prompt, no grammar
    auto        a structural tag: free text, and every <tool_call> span is a call of one of the functions
    required    JSON: one call object {"name", "arguments"} (an array of them with parallel_tool_calls)
    a name      JSON: one call of that function

`ToolCallParser` reads either form back, incrementally, so streamed replies carry OpenAI's tool-call deltas
(the name first, then argument fragments) while the model writes them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from specdesk.engine.json_schema import close_objects
from specdesk.engine.structured_output import StructuredOutput

CALL_BEGIN = "<tool_call>"
CALL_END = "</tool_call>"
ToolChoice = str  # "none" | "auto" | "required" | a function name (see `tool_choice_name`)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: `arguments` is JSON text (OpenAI's wire shape)."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def function_specs(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI-shaped tools, checked: ValueError starting with "tools" if bad."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        params = fn.get("parameters", _ANY_OBJECT)
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        if name in (f["name"] for f in out):
            raise ValueError(f"tools[{i}].function.name {name!r} is declared twice")
        out.append({**fn, "parameters": params or _ANY_OBJECT})
    return out


def tool_choice_name(choice: object, functions: list[dict[str, Any]]) -> ToolChoice:
    """OpenAI's tool_choice as "none", "auto", "required" or a declared function's name (ValueError
    starting with "tool_choice" otherwise). Without tools only "none" and "auto" make sense."""
    if choice is None:
        return "auto" if functions else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}")
        if choice == "required" and not functions:
            raise ValueError("tool_choice 'required' needs tools")
        return choice if functions else "none"
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice must be {'type': 'function', 'function': {'name': ...}}")
    if name not in (f["name"] for f in functions):
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    return name


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    # "name" first: grammars emit properties in schema order, and the streaming parser wants the name early.
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": close_objects(fn["parameters"])},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def structured_output(
    functions: list[dict[str, Any]], choice: ToolChoice, parallel_tool_calls: bool = True
) -> StructuredOutput | None:
    """The grammar that makes the output honour `choice` (None for "none", or "auto" without tools).

    required / named: a JSON schema (the reply is the call object itself, or an array with parallel calls);
    auto: a structural tag in xgrammar's format (`triggered_tags`): free text until `<tool_call>`, whose span
    must be one function's call object and close with `</tool_call>`.
    """
    if choice == "none" or not functions:
        return None
    if choice == "auto":
        tags = [
            {"type": "tag", "begin": f"{CALL_BEGIN}\n", "end": f"\n{CALL_END}",
             "content": {"type": "json_schema", "json_schema": _call_schema(f)}}
            for f in functions
        ]  # fmt: skip
        tag = {
            "type": "structural_tag",
            "format": {
                "type": "triggered_tags", "triggers": [CALL_BEGIN], "tags": tags,
                "at_least_one": False, "stop_after_first": not parallel_tool_calls,
            },
        }  # fmt: skip
        return StructuredOutput("structural_tag", json.dumps(tag))
    chosen = functions if choice == "required" else [f for f in functions if f["name"] == choice]
    assert chosen, choice
    one = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(f) for f in chosen]}
    if choice == "required" and parallel_tool_calls:
        return StructuredOutput("json_schema", json.dumps({"type": "array", "items": one, "minItems": 1}))
    return StructuredOutput("json_schema", json.dumps(one))


def response_format(fmt: dict[str, Any] | None) -> StructuredOutput | None:
    """OpenAI's response_format: text (no grammar), json_object (any JSON object) or json_schema (ValueError
    starting with "response_format" otherwise). `strict` false still constrains: a grammar is how we honour
    a schema at all."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise ValueError(f"response_format type {kind!r} is not one of text, json_object, json_schema")
    spec = (fmt or {}).get("json_schema")
    schema = spec.get("schema", {}) if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ValueError("response_format.json_schema.schema must be a JSON schema object")
    if (
        isinstance(spec, dict) and spec.get("strict") is True
    ):  # OpenAI's strict mode: no property the schema does not declare
        schema = close_objects(schema)
    return StructuredOutput("json_schema", json.dumps(schema))


def schema_section(schema_json: str) -> str:
    """The system-prompt note that tells the model the JSON schema its reply must follow (the grammar
    enforces the form; a model that knows the schema fills it with what the keys mean)."""
    return f"Reply with one JSON object that follows this JSON schema:\n{schema_json}"


def tools_section(functions: list[dict[str, Any]]) -> str:
    """The system-prompt section that describes the functions and the exact call format."""
    signatures = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query. The functions are "
        f"described here as JSON signatures:\n<tools>\n{signatures}\n</tools>\n\n"
        "To call a function, reply with one JSON object per call, each inside <tool_call></tool_call> tags:\n"
        f'{CALL_BEGIN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_END}\n'
        "A function's result comes back inside <tool_response></tool_response> tags."
    )


def call_text(name: str, arguments: str | dict[str, Any]) -> str:
    """A call as the model writes it (used to render earlier calls back into the prompt)."""
    args = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else arguments or {}
    return f"{CALL_BEGIN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CALL_END}"


def prompt_messages(messages: list[dict[str, Any]], functions: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Role/content messages any chat template renders: the tools section joins the system prompt (or opens
    one), assistant `tool_calls` become call text, and `tool` results <tool_response> blocks in one user
    turn with any user message next to them. Messages are {"role", "content", "tool_calls"?}, calls in
    OpenAI's shape."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"].get("arguments") or "{}") for c in m["tool_calls"]]
            content = "\n".join([content, *calls]) if content else "\n".join(calls)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        # Many templates refuse two user turns in a row: tool results join the user turn beside them, and
        # so does a customer message after a reply that was left out (a call never answered).
        if out and role == out[-1]["role"] == "user":
            out[-1]["content"] += ("\n" if m["role"] == "tool" else "\n\n") + content
            continue
        out.append({"role": role, "content": content})
    return with_system_section(out, tools_section(functions)) if functions else out


def with_system_section(messages: list[dict[str, str]], section: str) -> list[dict[str, str]]:
    """`section` appended to the system prompt, or as one when there is none."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{section}"}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


@dataclass
class ToolEvent:
    """What the parser found: text (`kind` "content"), a call's start (`name`, `call_id`) or a fragment of
    its JSON arguments ("arguments"); `index` numbers the calls from 0."""

    kind: str
    text: str = ""
    index: int = 0
    name: str = ""
    call_id: str = ""


_NAME_FIRST = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCallParser:
    """Incremental reader of a reply: `feed(text)` and `finish()` return ToolEvents.

    json_mode: the whole reply is call JSON (tool_choice required / named) rather than text with tagged
    calls. Argument text streams as soon as it is known to belong to the arguments value; a call whose
    object does not start with "name" then "arguments" is emitted whole once it ends.
    """

    json_mode: bool = False
    calls: list[ToolCall] = field(default_factory=list)
    _pending: str = ""  # tagged mode: text that may be the start of CALL_BEGIN
    _in_call: bool = False
    _buf: str = ""  # the current call's text
    _args_from: int | None = None  # where the arguments value starts in _buf
    _scanned: int = 0  # _buf[_args_from:_scanned] is already emitted
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _args_done: bool = False
    _args: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        rest = self._pending + text
        self._pending = ""
        while rest:
            if self._in_call:
                rest = self._feed_call(rest, events)
            elif self.json_mode:
                stripped = rest.lstrip(" \t\r\n[],")
                if not stripped:
                    break
                if stripped[0] != "{":  # not call JSON after all: pass it through as text
                    events.append(ToolEvent("content", stripped))
                    break
                self._open_call()
                rest = stripped
            else:
                at = rest.find(CALL_BEGIN)
                if at < 0:
                    keep = _partial_suffix(rest, CALL_BEGIN)
                    if len(rest) > keep:
                        events.append(ToolEvent("content", rest[: len(rest) - keep]))
                    self._pending = rest[len(rest) - keep :]
                    break
                if at:
                    events.append(ToolEvent("content", rest[:at]))
                self._open_call()
                rest = rest[at + len(CALL_BEGIN) :]
        return events

    def finish(self) -> list[ToolEvent]:
        """Flush: a call still open at the end (a stop string cut its closing tag) ends here."""
        events: list[ToolEvent] = []
        if self._in_call:
            self._close_call(events)
        elif self._pending:
            events.append(ToolEvent("content", self._pending))
            self._pending = ""
        return events

    def _open_call(self) -> None:
        self._in_call, self._buf, self._args_from, self._scanned = True, "", None, 0
        self._depth, self._in_string, self._escaped, self._args_done, self._args = 0, False, False, False, []

    def _feed_call(self, text: str, events: list[ToolEvent]) -> str:
        """Consume a call's text; return what follows the call."""
        start = len(self._buf)
        self._buf += text
        if self._args_from is None:
            m = _NAME_FIRST.match(self._buf)
            if m:
                self._args_from = self._scanned = m.end()
                self._start_event(json.loads(f'"{m.group(1)}"'), events)
        if self._args_from is not None and not self._args_done:
            # The arguments first: a closing tag inside one of their strings (a customer's pasted text) is
            # text, not the end of the call.
            self._scan_args(events, -1)
        end_at = -1
        if not self.json_mode and (self._args_from is None or self._args_done):
            end_at = self._buf.find(
                CALL_END, self._scanned if self._args_from is not None else max(0, start - len(CALL_END))
            )
        if self.json_mode and self._args_done:
            close = self._buf.find("}", self._scanned)
            if close >= 0:
                rest = self._buf[close + 1 :]
                self._buf = self._buf[: close + 1]
                self._close_call(events)
                return rest
        if end_at >= 0:
            rest = self._buf[end_at + len(CALL_END) :]
            self._buf = self._buf[:end_at]
            self._close_call(events, tagged=True)
            return rest
        return ""

    def _start_event(self, name: str, events: list[ToolEvent]) -> None:
        self.calls.append(ToolCall(new_call_id(), name, ""))
        events.append(ToolEvent("call", index=len(self.calls) - 1, name=name, call_id=self.calls[-1].id))

    def _scan_args(self, events: list[ToolEvent], limit: int) -> None:
        # Walk the arguments value, tracking strings and nesting, and emit what is certainly inside it.
        assert self._args_from is not None
        stop = len(self._buf) if limit < 0 else limit
        i = self._scanned
        while i < stop and not self._args_done:
            ch = self._buf[i]
            if self._in_string:
                self._escaped, self._in_string = (not self._escaped and ch == "\\"), (self._escaped or ch != '"')
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif self._depth == 0 and ch in "}],":  # a scalar value ended
                self._args_done = True
                break
            elif ch in "}]":
                self._depth -= 1
                self._args_done = self._depth == 0
            i += 1
        fragment = self._buf[self._scanned : i]
        self._scanned = i
        if fragment:
            self._args.append(fragment)
            events.append(ToolEvent("arguments", fragment, index=len(self.calls) - 1))

    def _close_call(self, events: list[ToolEvent], tagged: bool = False) -> None:
        self._in_call = False
        if self._args_from is not None:
            call = self.calls[-1]
            self.calls[-1] = ToolCall(call.id, call.name, "".join(self._args).strip())
            return
        # Not name-first: parse the whole object now, or give it back as text when it is no call at all.
        try:
            obj = json.loads(self._buf)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raw = self._buf if self.json_mode else f"{CALL_BEGIN}{self._buf}{CALL_END if tagged else ''}"
            events.append(ToolEvent("content", raw))
            return
        args = obj.get("arguments", obj.get("parameters", {}))
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        self._start_event(obj["name"], events)
        self.calls[-1] = ToolCall(self.calls[-1].id, obj["name"], arguments)
        events.append(ToolEvent("arguments", arguments, index=len(self.calls) - 1))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (held back until known)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse_reply(text: str, json_mode: bool = False) -> tuple[str, list[ToolCall]]:
    """A finished reply split into its text (calls removed, stripped) and its calls."""
    parser = ToolCallParser(json_mode=json_mode)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if e.kind == "content")
    return (content.strip() if parser.calls else content), parser.calls
