"""/v1's tool-call wire format with tool_choice "auto", where a model writes text and then a call: the engine
behind the routes is scripted (a model's reply, in pieces), so the test pins the server's parsing and
chunking exactly; the real engine's constrained runs are in test_api_tools.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from specdesk.app.api import mount_openai_api
from specdesk.engine.llm import LLM
from specdesk.engine.outputs import FinishReason, RequestMetrics, StreamDelta
from specdesk.engine.sampling_params import SamplingParams
from tests.app.live_server import serve
from tests.app.test_api import MODEL
from tests.tiny_models import make_tiny_model

TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "escalate_to_human"}},
]
ARGS = {"order_id": "48213", "note": 'say "hi" {ok}'}
REPLY = (
    f'Let me check that.\n<tool_call>\n{{"name": "lookup_order", "arguments": {json.dumps(ARGS)}}}\n</tool_call>\n'
    '<tool_call>\n{"name": "escalate_to_human", "arguments": {}}\n</tool_call>'
)


class ScriptedLLM:
    """The LLM surface /v1 uses, replying with REPLY in 3-character pieces (prompts are really encoded)."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.tokenizer, self.model_name = llm, llm.tokenizer, llm.model_name
        self.max_model_len = 4096
        self.params: list[SamplingParams] = []

    def encode(self, prompt: Any) -> list[int]:
        return self.llm.encode(prompt)

    def prepare_grammar(self, params: SamplingParams) -> None:
        pass  # scripted replies: no grammar runs

    def submit(self, prompt: list[int], params: SamplingParams, cache_salt: str | None = None) -> str:
        self.params.append(params)
        return f"r{len(self.params)}"

    def deltas(self, request_id: str) -> Iterator[StreamDelta]:
        pieces = [REPLY[i : i + 3] for i in range(0, len(REPLY), 3)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield StreamDelta(
                request_id, piece, [0], finished=last, finish_reason=FinishReason.STOP if last else None,
                metrics=RequestMetrics() if last else None,
            )  # fmt: skip

    def abort(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptedLLM]:
    llm = LLM(model=str(make_tiny_model("qwen2", tmp_path_factory.mktemp("wire"))), device="cpu", num_blocks=16)
    yield ScriptedLLM(llm)
    llm.shutdown()


@pytest.fixture(scope="module")
def client(scripted: ScriptedLLM) -> Iterator[openai.OpenAI]:
    app = FastAPI()
    mount_openai_api(app, scripted, MODEL)  # type: ignore[arg-type]
    with serve(app) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)


def test_auto_streams_text_then_calls(client: openai.OpenAI, scripted: ScriptedLLM) -> None:
    messages: Any = [{"role": "user", "content": "Where is my order 48213?"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, stream=True))
    so = scripted.params[-1].structured_output
    assert so is not None and so.kind == "structural_tag"  # auto: free text or tagged calls
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    assert content == "Let me check that.\n\n"  # the text around the calls, never a piece of a tag
    items = [tc for d in deltas for tc in d.tool_calls or []]
    starts = [tc for tc in items if tc.id]
    assert [(tc.index, tc.function and tc.function.name) for tc in starts] == [
        (0, "lookup_order"),
        (1, "escalate_to_human"),
    ]
    assert all(tc.id and tc.id.startswith("call_") and tc.type == "function" for tc in starts)
    for index, args in ((0, ARGS), (1, {})):
        fragments = [tc.function.arguments or "" for tc in items if tc.index == index and tc.function]
        assert json.loads("".join(fragments)) == args
    assert len([tc for tc in items if tc.index == 0 and not tc.id]) > 3  # arguments stream in fragments
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert not any(d.content for d in deltas[first_call : first_call + 5])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_auto_whole_reply(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Where is my order 48213?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me check that."
    calls = message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("lookup_order", ARGS), ("escalate_to_human", {}),
    ]  # fmt: skip
    assert len({c.id for c in calls}) == 2
