"""ChatSpecDesk's sampling fields, logprobs, tools and structured output on a tiny random-weight engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from pydantic import BaseModel

from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams
from specdesk.langchain import ChatSpecDesk, to_chat_dicts
from tests.tiny_models import make_tiny_model


class LookupOrder(BaseModel):
    """Look an order up by its number."""

    order_id: Literal["48213", "11111"]
    urgent: bool


class Intent(BaseModel):
    """What the customer wants."""

    intent: Literal["refund", "delivery"]
    urgent: bool


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    # The tools section is long in the tiny tokenizer (about a token per character): a longer context.
    path = make_tiny_model("qwen2", tmp_path_factory.mktemp("lct"), max_position_embeddings=2048)
    engine = LLM(model=str(path), dtype="float32", device="cpu", num_blocks=192, attention_backend="torch")
    yield engine
    engine.shutdown()


def test_sampling_fields_reach_the_engine(llm: LLM) -> None:
    fields = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.3, "min_p": 0.05}
    chat = ChatSpecDesk(llm=llm, max_tokens=10, **fields)
    reply = chat.invoke("Where is my parcel?")
    expected = llm.chat(to_chat_dicts([HumanMessage("Where is my parcel?")]), SamplingParams(max_tokens=10, **fields))
    assert reply.content == expected.text
    token_id = llm.tokenizer.encode(" order")[0]
    forced = ChatSpecDesk(llm=llm, max_tokens=3).invoke("Hi", logit_bias={token_id: 100})
    assert forced.content == llm.tokenizer.decode([token_id] * 3)
    with pytest.raises(ValueError, match="min_p"):
        ChatSpecDesk(llm=llm, min_p=2.0)


def test_logprobs_as_langchain_openai_shapes_them(llm: LLM) -> None:
    chat = ChatSpecDesk(llm=llm, max_tokens=6, logprobs=True, top_logprobs=2)
    reply = chat.invoke("Hello")
    content = reply.response_metadata["logprobs"]["content"]
    assert len(content) == 6 and "".join(t["token"] for t in content) == reply.content
    assert all(set(t) == {"token", "logprob", "bytes", "top_logprobs"} and len(t["top_logprobs"]) == 2 for t in content)
    chunks = list(chat.stream("Hello"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    streamed = merged.response_metadata["logprobs"]["content"]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]
    assert [t["logprob"] for t in streamed] == pytest.approx([t["logprob"] for t in content], abs=1e-5)
    assert "logprobs" not in ChatSpecDesk(llm=llm, max_tokens=2).invoke("Hello").response_metadata


def test_tool_history_renders_in_the_protocol(llm: LLM) -> None:
    call = {"name": "LookupOrder", "args": {"order_id": "48213", "urgent": False}, "id": "call_1"}
    history = [
        HumanMessage("Where is 48213?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("shipped", tool_call_id="call_1"),
    ]
    dicts = to_chat_dicts(history)
    assert [d["role"] for d in dicts] == ["user", "assistant", "user"]
    assert json.loads(dicts[1]["content"].split("\n")[1]) == {"name": "LookupOrder", "arguments": call["args"]}
    assert dicts[2]["content"] == "<tool_response>\nshipped\n</tool_response>"
    reply = ChatSpecDesk(llm=llm, max_tokens=4).bind_tools([LookupOrder], tool_choice="none").invoke(history)
    assert isinstance(reply, AIMessage) and reply.content and not reply.tool_calls


def test_bind_tools_translates_choices(llm: LLM) -> None:
    chat = ChatSpecDesk(llm=llm)
    bound = chat.bind_tools([LookupOrder], tool_choice="any", parallel_tool_calls=False)
    assert bound.kwargs["tool_choice"] == "required" and bound.kwargs["parallel_tool_calls"] is False  # type: ignore[attr-defined]
    assert bound.kwargs["tools"][0]["function"]["name"] == "LookupOrder"  # type: ignore[attr-defined]
    named = chat.bind_tools([LookupOrder], tool_choice="LookupOrder")
    assert named.kwargs["tool_choice"] == {"type": "function", "function": {"name": "LookupOrder"}}  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="tool_choice"):
        chat.bind_tools([LookupOrder], tool_choice="nope").invoke("hi")


def test_forced_tool_call_invoke_and_stream(llm: LLM) -> None:
    # strict: no extra properties, so random weights must close the object (a model would choose to)
    chat = ChatSpecDesk(llm=llm, max_tokens=120).bind_tools(
        [LookupOrder], tool_choice="any", parallel_tool_calls=False, strict=True
    )
    reply = chat.invoke("Where is my order 48213?")
    assert isinstance(reply, AIMessage) and len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert call["name"] == "LookupOrder" and call["id"] and call["id"].startswith("call_")
    LookupOrder.model_validate(call["args"])
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    chunks = list(chat.stream("Where is my order 48213?"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    first = next(c for c in chunks if c.tool_call_chunks)
    assert first.tool_call_chunks[0]["name"] == "LookupOrder"  # the name comes first, then argument fragments
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert [(t["name"], t["args"]) for t in merged.tool_calls] == [(call["name"], call["args"])]  # greedy


def test_structured_output_include_raw_keeps_parsing_errors(llm: LLM) -> None:
    # json_mode asks for any JSON object, which need not be an Intent: the error is kept, not raised.
    chat = ChatSpecDesk(llm=llm, max_tokens=8)
    raw = chat.with_structured_output(Intent, method="json_mode", include_raw=True).invoke("I want a refund")
    assert (
        isinstance(raw, dict) and isinstance(raw["raw"], AIMessage) and set(raw) == {"raw", "parsed", "parsing_error"}
    )
    assert (raw["parsed"] is None) != (raw["parsing_error"] is None)
    with pytest.raises(ValueError, match="method"):
        chat.with_structured_output(Intent, method="xml")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm: LLM, method: Literal["json_schema", "function_calling"]) -> None:
    chat = ChatSpecDesk(llm=llm, max_tokens=120)
    result = chat.with_structured_output(Intent, method=method, strict=True).invoke("I want a refund")
    assert isinstance(result, Intent)
    as_dict = chat.with_structured_output(Intent.model_json_schema(), method=method, include_raw=True, strict=True)
    out = as_dict.invoke("I want a refund")
    assert isinstance(out, dict) and out["parsing_error"] is None and Intent.model_validate(out["parsed"])
