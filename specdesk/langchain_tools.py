"""Tools, structured output and logprobs for `ChatSpecDesk` (specdesk/langchain.py), in the shapes
langchain-openai gives them, so chains written against ChatOpenAI read SpecDesk's messages unchanged.

The model-facing protocol (prompt section, grammar per tool_choice, parser) is engine/tool_calls.py, the
same one `/v1` uses; here LangChain's messages become OpenAI-shaped dicts and parsed calls become
`tool_call_chunks`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticToolsParser
from langchain_core.output_parsers.base import OutputParserLike
from langchain_core.output_parsers.pydantic import PydanticOutputParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from specdesk.engine import tool_calls
from specdesk.engine.structured_output import StructuredOutput
from specdesk.engine.tool_calls import ToolCallParser, ToolEvent

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "user": "user", "assistant": "assistant"}
StructuredMethod = Literal["json_schema", "function_calling", "json_mode"]


@dataclass(frozen=True)
class Plan:
    """One call's prompt messages, grammar and reply reader (None: plain text)."""

    messages: list[dict[str, str]]
    structured: StructuredOutput | None
    json_mode: bool
    parses_tools: bool

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(json_mode=self.json_mode) if self.parses_tools else None


def plan(messages: list[BaseMessage], kwargs: dict[str, Any]) -> Plan:
    """The call's kwargs (`tools`, `tool_choice`, `parallel_tool_calls` from bind_tools, `response_format`
    from with_structured_output) applied to its messages. ValueError names what is wrong."""
    functions = tool_calls.function_specs(kwargs.get("tools") or [])
    choice = tool_calls.tool_choice_name(kwargs.get("tool_choice"), functions)
    fmt = tool_calls.response_format(kwargs.get("response_format"))
    dicts = to_openai_dicts(messages)
    if choice == "none":
        prompt = tool_calls.prompt_messages(dicts, [])
        if fmt is not None and fmt.kind == "json_schema":  # as OpenAI's structured outputs tell the model
            prompt = tool_calls.with_system_section(prompt, tool_calls.schema_section(fmt.spec))
        return Plan(prompt, fmt, False, False)
    if fmt is not None:
        raise ValueError("response_format cannot constrain a reply that may call tools")
    parallel = kwargs.get("parallel_tool_calls")
    structured = tool_calls.structured_output(functions, choice, True if parallel is None else parallel)
    return Plan(tool_calls.prompt_messages(dicts, functions), structured, choice != "auto", True)


def to_openai_dicts(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """OpenAI-shaped message dicts: text content, AIMessage.tool_calls as `tool_calls`, ToolMessages as
    `tool` turns. Consecutive plain turns of one role are merged, since many chat templates reject two user
    (or system) turns in a row."""
    out: list[dict[str, Any]] = []
    for message in messages:
        kind = message.role if isinstance(message, ChatMessage) else message.type
        content = message.content
        # An AIMessage's call blocks (LangChain's tool_call, Anthropic's tool_use) repeat its tool_calls;
        # its reasoning blocks (Anthropic's thinking) are not part of the conversation the model reads.
        call_blocks = ("tool_call", "tool_use", "thinking", "reasoning") if isinstance(message, AIMessage) else ()
        if isinstance(content, list) and any(
            not isinstance(b, str) and b.get("type") not in ("text", *call_blocks) for b in content
        ):  # fmt: skip
            raise ValueError("only text content is supported")
        text = message.text
        if isinstance(message, ToolMessage) or kind == "tool":
            out.append({"role": "tool", "content": text, "tool_call_id": getattr(message, "tool_call_id", None)})
            continue
        role = _ROLES.get(kind)
        if role is None:
            raise ValueError(f"{type(message).__name__} ({kind!r}) is not supported: SpecDesk chat is text only")
        if isinstance(message, AIMessage) and message.tool_calls:
            calls = [
                {"id": c.get("id"), "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
                for c in message.tool_calls
            ]  # fmt: skip
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif out and out[-1]["role"] == role and "tool_calls" not in out[-1]:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


def tool_choice_kwarg(tool_choice: object) -> object:
    """LangChain's tool_choice spellings in OpenAI's: "any"/True mean "required", a bare name a function."""
    if tool_choice in ("any", True):
        return "required"
    if tool_choice is False:
        return "none"
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
        return {"type": "function", "function": {"name": tool_choice}}
    return tool_choice


def openai_tools(tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool], strict: bool | None) -> list:
    return [convert_to_openai_tool(t, strict=strict) for t in tools]


def event_chunk(event: ToolEvent) -> AIMessageChunk:
    """A parser event as a message chunk: text content, or a tool_call_chunk (name and id first, then
    argument fragments, merged by index as langchain-openai's are)."""
    if event.kind == "content":
        return AIMessageChunk(content=event.text)
    if event.kind == "call":
        chunk = tool_call_chunk(name=event.name, args="", id=event.call_id, index=event.index)
    else:
        chunk = tool_call_chunk(name=None, args=event.text, id=None, index=event.index)
    return AIMessageChunk(content="", tool_call_chunks=[chunk])


def structured_runnable(
    bind: Callable[..., Runnable[LanguageModelInput, BaseMessage]], schema: dict[str, Any] | type,
    method: StructuredMethod, include_raw: bool, strict: bool | None,
) -> Runnable[LanguageModelInput, Any]:  # fmt: skip
    """with_structured_output as langchain-openai builds it: a grammar-backed json_schema / json_mode
    response, or a forced call of one function; parsed into the pydantic class or a dict."""
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    parser: OutputParserLike
    if method == "function_calling":
        tool = convert_to_openai_tool(schema, strict=strict)
        name = tool["function"]["name"]
        llm = bind(
            tools=[tool], tool_choice={"type": "function", "function": {"name": name}}, parallel_tool_calls=False,
            ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": tool},
        )  # fmt: skip
        parser = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            if is_pydantic
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        )
    elif method in ("json_schema", "json_mode"):
        json_schema = convert_to_json_schema(schema)
        fmt: dict[str, Any] = {"type": "json_object"}
        if method == "json_schema":
            spec = {"name": json_schema.get("title", "output"), "schema": json_schema, "strict": strict}
            fmt = {"type": "json_schema", "json_schema": spec}
        llm = bind(
            response_format=fmt,
            ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": json_schema},
        )
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
    else:
        raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    fallback = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")
