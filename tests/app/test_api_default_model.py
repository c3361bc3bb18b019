"""/v1 tools and structured output on the default model (SmolLM2-135M-Instruct with its speculator),
through the official openai client: a streamed tool-call round trip and a json_schema reply that validates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import ChatCompletionToolParam

from specdesk.app.api import mount_openai_api
from specdesk.engine.llm import LLM
from tests.app.live_server import serve

pytestmark = pytest.mark.slow

MODEL = "specdesk"
LOOKUP: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look up an order's status by its order number.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string", "description": "The order number, digits only."}},
            "required": ["order_id"],
        },
    },
}
TICKET = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "intent": {"type": "string", "enum": ["refund", "delivery", "cancel", "other"]},
        "urgency": {"type": "string", "enum": ["low", "medium", "high"]},
    },
    "required": ["order_id", "intent", "urgency"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    llm = LLM(device="cpu")
    app = FastAPI()
    mount_openai_api(app, llm, MODEL)
    with serve(app) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    llm.shutdown()


def test_streamed_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You are a support agent for an online shop."},
        {"role": "user", "content": "Hi, where is my order 48213? It has not arrived."},
    ]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[LOOKUP], tool_choice="required", parallel_tool_calls=False,
        max_tokens=64, temperature=0, stream=True,
    )  # fmt: skip
    call = {"id": "", "name": "", "arguments": ""}
    reasons = []
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            call["id"] += tc.id or ""
            call["name"] += (tc.function and tc.function.name) or ""
            call["arguments"] += (tc.function and tc.function.arguments) or ""
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert reasons == ["tool_calls"] and call["name"] == "lookup_order" and call["id"].startswith("call_")
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, LOOKUP["function"]["parameters"])  # type: ignore[typeddict-item]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}},
        ]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"status": "shipped", "eta": "Monday"}'},
    ]  # fmt: skip
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[LOOKUP], tool_choice="none", max_tokens=48, temperature=0
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_json_schema_reply_validates(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, max_tokens=64, temperature=0,
        messages=[
            {"role": "system", "content": "Extract the order number, intent and urgency as JSON."},
            {"role": "user", "content": "My lamp from order 48213 arrived broken, I want my money back today!"},
        ],
        response_format={"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET, "strict": True}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), TICKET)
