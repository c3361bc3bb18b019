"""ChatSpecDesk over a tiny random-weight engine: plumbing, not prose."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Iterator
from typing import cast

import pytest
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, FunctionMessage, HumanMessage, SystemMessage

from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams
from specdesk.langchain import ChatSpecDesk, to_chat_dicts
from tests.helpers import wait_idle
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    path = make_tiny_model("qwen2", tmp_path_factory.mktemp("lc"))
    engine = LLM(model=str(path), dtype="float32", device="cpu", num_blocks=96, attention_backend="torch")
    yield engine
    engine.shutdown()


@pytest.fixture
def chat(llm: LLM) -> ChatSpecDesk:
    return ChatSpecDesk(llm=llm, max_tokens=6)


def test_invoke_matches_the_engine(chat: ChatSpecDesk, llm: LLM) -> None:
    messages = [SystemMessage("Be brief."), HumanMessage("Where is my parcel?")]
    reply = chat.invoke(messages)
    expected = llm.chat(to_chat_dicts(messages), SamplingParams(max_tokens=6))
    assert isinstance(reply, AIMessage) and reply.content == expected.text
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == len(expected.prompt_token_ids)
    assert reply.usage_metadata["output_tokens"] == 6
    assert reply.response_metadata["model_name"] == llm.loaded.name
    assert reply.response_metadata["finish_reason"] == "length"


def test_stream_reports_usage_once(chat: ChatSpecDesk) -> None:
    chunks = list(chat.stream("Hello"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks) and len(chunks) > 1
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata is not None
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == chat.invoke("Hello").content
    assert full.usage_metadata and full.usage_metadata["output_tokens"] == 6


def test_call_overrides_and_stop(chat: ChatSpecDesk) -> None:
    text = str(chat.invoke("Hello", max_tokens=10).content)
    stop = text[4:7]
    cut = chat.invoke("Hello", max_tokens=10, stop=[stop])
    assert cut.response_metadata["finish_reason"] == "stop" and stop not in str(cut.content)
    # constructor stop works as well, and sampled calls with a seed are reproducible
    assert ChatSpecDesk(llm=chat.llm, max_tokens=10, stop=[stop]).invoke("Hello").content == cut.content
    a = chat.invoke("Hello", temperature=0.9, seed=7).content
    assert chat.invoke("Hello", temperature=0.9, seed=7).content == a


def test_async_does_not_block_the_loop(chat: ChatSpecDesk) -> None:
    async def main() -> tuple[list[str], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        streamed = [str(c.content) async for c in chat.astream("Hello", max_tokens=30, ignore_eos=True)]
        invoked = await chat.ainvoke("Hello")
        tick_task.cancel()
        return [*streamed, str(invoked.content)], ticks

    parts, ticks = asyncio.run(main())
    assert "".join(parts[:-1]).startswith(parts[-1])  # greedy: 30 tokens extend the 6-token reply
    assert ticks > 5  # the loop kept running while the engine generated


def test_batch_and_abatch(chat: ChatSpecDesk, llm: LLM) -> None:
    prompts: list[LanguageModelInput] = ["Hello", "Where is my parcel?", "Refund please"]
    replies = chat.batch(prompts)
    assert [r.content for r in replies] == [chat.invoke(p).content for p in prompts]
    areplies = asyncio.run(chat.abatch(prompts))
    assert [r.content for r in areplies] == [r.content for r in replies]
    wait_idle(llm)


def test_stopping_a_stream_early_aborts(chat: ChatSpecDesk, llm: LLM) -> None:
    stream = cast(Generator[AIMessageChunk], chat.stream("Hello", max_tokens=400, ignore_eos=True))
    next(stream)
    stream.close()
    wait_idle(llm)

    async def partial() -> None:
        agen = chat.astream("Hello", max_tokens=400, ignore_eos=True)
        await agen.__anext__()
        await agen.aclose()  # type: ignore[attr-defined]

    asyncio.run(partial())
    wait_idle(llm)


def test_messages_and_validation(llm: LLM) -> None:
    merged = to_chat_dicts([SystemMessage("a"), SystemMessage("b"), HumanMessage("c"), HumanMessage("d")])
    assert merged == [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "c\n\nd"}]
    assert to_chat_dicts([HumanMessage([{"type": "text", "text": "hi"}])]) == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="not supported"):
        to_chat_dicts([FunctionMessage("42", name="f")])
    with pytest.raises(ValueError, match="text"):
        to_chat_dicts([HumanMessage([{"type": "image", "url": "https://x/y.png"}])])
    with pytest.raises(ValueError, match="temperature"):
        ChatSpecDesk(llm=llm, temperature=-1)
    with pytest.raises(ValueError, match="speculator"):
        ChatSpecDesk(llm=llm, speculator="some/other")
    with pytest.raises(ValueError, match="serves"):
        ChatSpecDesk(llm=llm).invoke("hi", model="gpt-4o")
    with pytest.raises(ValueError, match=r"too long|context"):
        ChatSpecDesk(llm=llm).invoke("refund " * 2000)


def test_construction_is_lazy() -> None:
    started = time.perf_counter()
    chat = ChatSpecDesk(model="/does/not/exist", max_tokens=4, temperature=0.5, top_p=0.9, speculator="x")
    assert time.perf_counter() - started < 0.5
    assert chat._get_ls_params()["ls_model_name"] == "/does/not/exist"
    assert ChatSpecDesk()._get_ls_params()["ls_model_name"] == "SmolLM2-135M-Instruct"
