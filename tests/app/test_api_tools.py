"""/v1 tools and structured output through the official openai client on the tiny model: requests that
carry tools, tool calls and tool results render and run; bad tools, tool_choice and response_format get a
400 naming the field; with a grammar the tiny model's replies are tool calls / JSON that validate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from specdesk.app.api import mount_openai_api
from specdesk.engine.llm import LLM
from tests.app.live_server import NUM_BLOCKS, serve
from tests.app.test_api import MESSAGES, MODEL
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The tools section is long in the tiny tokenizer (about a token per character): a longer context.
    path = make_tiny_model("qwen2", tmp_path_factory.mktemp("tools"), max_position_embeddings=2048)
    llm = LLM(model=str(path), dtype="float32", device="cpu", num_blocks=NUM_BLOCKS * 2, attention_backend="torch")
    app = FastAPI()
    mount_openai_api(app, llm, MODEL)
    with serve(app) as base:
        yield base
    llm.shutdown()


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


# Bounded schemas: a random-weight model under a grammar must still finish within a few tokens.
ORDER_ARGS = {
    "type": "object",
    "properties": {"order_id": {"type": "string", "enum": ["48213", "11111"]}, "urgent": {"type": "boolean"}},
    "required": ["order_id", "urgent"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {"name": "lookup_order", "description": "Find an order.", "parameters": ORDER_ARGS},
    },
]
INTENT = {
    "type": "object",
    "properties": {"intent": {"type": "string", "enum": ["refund", "delivery"]}, "urgent": {"type": "boolean"}},
    "required": ["intent", "urgent"],
    "additionalProperties": False,
}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Where is my order 48213?"}]


def test_tool_round_trip_messages_render(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "1"}'}}
    messages: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}, {"role": "robot", "content": "x"}]},
         "messages.1.role"),
    ],
)  # fmt: skip
def test_bad_tools_get_400(url: str, overrides: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **overrides}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_streamed_tool_call_round_trip(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=120, temperature=0, stream=True,
    )  # fmt: skip
    calls: dict[int, dict[str, str]] = {}
    reasons, content = [], ""
    first_fragment: list[Any] = []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                first_fragment.append(tc)
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += tc.id or ""
            call["name"] += (tc.function and tc.function.name) or ""
            call["arguments"] += (tc.function and tc.function.arguments) or ""
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert reasons == ["tool_calls"] and content == ""
    assert first_fragment[0].id.startswith("call_") and first_fragment[0].function.name == "lookup_order"
    [call] = calls.values()
    jsonschema.validate(json.loads(call["arguments"]), ORDER_ARGS)
    # The result goes back and the model answers in text.
    messages: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}},
        ]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"status": "shipped"}'},
    ]  # fmt: skip
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=6, temperature=0)
    assert final.choices[0].message.content is not None


def test_json_schema_response_validates(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "intent", "schema": INTENT, "strict": True}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), INTENT)
    obj = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0, response_format={"type": "json_object"}
    )
    assert obj.choices[0].message.content is not None
