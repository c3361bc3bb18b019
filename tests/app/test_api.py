"""The OpenAI-compatible API against a live server, through the official `openai` client (and raw httpx
where the wire itself is the point: SSE framing, disconnects)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam

from specdesk.app.api import mount_openai_api
from specdesk.engine.llm import LLM
from specdesk.engine.outputs import FinishReason
from specdesk.engine.sampling_params import SamplingParams
from tests.app.live_server import FinalDeltas, serve, tiny_llm, wait_idle

MODEL = "specdesk-tiny"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "Hello"},
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_llm(tmp_path_factory.mktemp("api"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def finals(llm: LLM) -> FinalDeltas:
    return FinalDeltas(llm)


@pytest.fixture(scope="module")
def url(llm: LLM, finals: FinalDeltas) -> Iterator[str]:
    app = FastAPI()
    mount_openai_api(app, llm, MODEL)
    with serve(app) as base:
        yield base


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models(client: openai.OpenAI, llm: LLM) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra and models[0].model_extra["max_model_len"] == llm.max_model_len
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completion(client: openai.OpenAI, llm: LLM) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # the tiny model never picks EOS greedily
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(llm.encode([dict(m) for m in MESSAGES]))
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    extra = choice.model_extra["specdesk"] if choice.model_extra else None
    assert extra is not None and {"num_cached_tokens", "tokens_per_step", "num_accepted_tokens"} <= set(extra)
    # The same conversation again: its full pages come from the prefix cache.
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage and again.usage.prompt_tokens_details and again.usage.prompt_tokens_details.cached_tokens


def test_chat_stream_wire_format(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *with_choices, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 8
    assert all(c.usage is None for c in with_choices)
    assert with_choices[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert reasons == ["length"]  # exactly one finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == full.choices[0].message.content  # greedy: streaming changes nothing


def test_raw_sse_ends_with_done(url: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert "usage" not in payloads[0]  # include_usage not asked: no usage key at all
    assert "specdesk" in payloads[-1]["choices"][0]  # the extension rides on the finish chunk


def test_completions(client: openai.OpenAI, llm: LLM) -> None:
    full = client.completions.create(model=MODEL, prompt="My order number is", max_tokens=5, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model=MODEL, prompt="My order number is", max_tokens=5, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    # token-id prompts, two prompts x n=2: indexes follow OpenAI's order (prompt-major)
    ids = llm.encode("My order number is")
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:-1]], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == full.choices[0].text[: len(batch.choices[0].text)]
    assert batch.usage and batch.usage.prompt_tokens == 2 * len(ids) - 1
    assert batch.usage.completion_tokens == 12


def test_stop_sequence(client: openai.OpenAI) -> None:
    text = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    stop = text[len(text) // 2 :][:3]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": "gpt-4o"}, "model"),
        ({"messages": [{"role": "user", "content": "refund " * 2000}]}, "messages"),
        ({"max_tokens": 100_000}, "messages"),
        ({"messages": []}, "messages"),
        ({"temperature": "hot"}, "temperature"),
        ({"repetition_penalty": 1e-40}, "repetition_penalty"),  # would divide a logit to inf in float32
    ],
)
def test_bad_requests_get_400(url: str, llm: LLM, overrides: dict[str, Any], param: str) -> None:
    before = llm.stats()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **overrides}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    assert llm.stats().num_steps == before.num_steps  # refused before reaching the engine
    # and the official client raises its typed error
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    vllm = {"repetition_penalty"}  # not the official client's own arguments: sent as extra_body
    known, extra = ({k: v for k, v in body.items() if (k in vllm) is side} for side in (False, True))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**known, extra_body=extra or None)


def test_a_batch_refused_midway_leaves_no_request_behind(url: str, llm: LLM) -> None:
    wait_idle(llm)
    open_streams = len(llm._streams)
    body = {"model": MODEL, "prompt": [[5, 6, 7]] * 3 + [[10**9]], "max_tokens": 2}  # the 4th: no such token
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    wait_idle(llm)
    # The three queued before the refusal were stopped and forgotten: nobody will read their deltas.
    assert len(llm._streams) == open_streams


def test_a_grammar_failing_midway_is_the_requests_error(url: str, llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    follow = llm.engine._follow_grammar

    def past_a_limit(seq: Any, new_tokens: list[int]) -> list[int]:
        if seq.grammar is not None:  # as llguidance does where a step exceeds its parser's limits
            raise ValueError("Parser Error: Current row has 8007 items; max is 2000")
        return follow(seq, new_tokens)

    monkeypatch.setattr(llm.engine, "_follow_grammar", past_a_limit)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "response_format": {"type": "json_object"}}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "structured output failed while generating" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200  # the engine serves on


def test_a_flood_of_grammar_compiles_leaves_plain_requests_served(
    url: str, llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    import concurrent.futures

    compile_for_real, release = llm.prepare_grammar, threading.Event()

    def slow_compile(params: SamplingParams) -> None:  # a big schema's seconds, held until released
        if params.structured_output is not None:
            assert release.wait(60)
        compile_for_real(params)

    monkeypatch.setattr(llm, "prepare_grammar", slow_compile)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "response_format": {"type": "json_object"}}
    with concurrent.futures.ThreadPoolExecutor(45) as pool:
        flood = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=90) for _ in range(45)]
        try:
            time.sleep(0.5)  # every compile has started waiting
            plain = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
            assert httpx.post(f"{url}/v1/chat/completions", json=plain, timeout=10).status_code == 200
        finally:
            release.set()
        assert all(f.result().status_code == 200 for f in flood)


def test_unsupported_features_are_refused(url: str) -> None:
    for extra in ({"echo": True}, {"suffix": "!"}, {"best_of": 2}):
        body = {"model": MODEL, "prompt": "Hi", **extra}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(extra))
    headers = {"Content-Type": "application/json"}
    assert httpx.post(f"{url}/v1/completions", content=b"{not json", headers=headers, timeout=30).status_code == 400


def test_api_keys(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    app = FastAPI()
    mount_openai_api(app, llm, MODEL, api_keys=["sk-flag"])
    with serve(app) as base:
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        no_key = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}, timeout=30)
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        assert openai.OpenAI(base_url=f"{base}/v1", api_key="sk-flag").models.list().data
        # Keys are the settings' (read once at start): the environment is never re-read per request.
        monkeypatch.setenv("SPECDESK_API_KEYS", "sk-env1, sk-env2")
        env_client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-env2", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            env_client.models.list()


def test_stream_disconnect_aborts_and_frees_pages(url: str, llm: LLM, finals: FinalDeltas) -> None:
    wait_idle(llm)
    before = set(finals.finals)
    body = {
        "model": MODEL,
        "prompt": "Where is my package?",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert llm.stats().num_blocks > llm.stats().num_free_blocks  # it holds pages while streaming
    # leaving the block closed the connection mid-stream
    (final,) = finals.wait_new(before)
    assert final.finish_reason is FinishReason.ABORT
    assert final.metrics is not None and final.metrics.num_generated_tokens < 400
    wait_idle(llm)


def test_non_stream_disconnect_aborts(url: str, llm: LLM, finals: FinalDeltas) -> None:
    wait_idle(llm)
    before = set(finals.finals)
    body = {"model": MODEL, "prompt": "Where is my package?", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    (final,) = finals.wait_new(before)
    assert final.finish_reason is FinishReason.ABORT
    wait_idle(llm)


def test_concurrent_streams_share_the_engine(url: str, llm: LLM) -> None:
    import concurrent.futures

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def one(i: int) -> str:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"ticket {i}"}],
            max_tokens=8,
            stream=True,
            seed=i,
            extra_body={"ignore_eos": True},
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(one, range(6)))
    assert all(texts)
    wait_idle(llm)


def test_openapi_schema_still_builds(llm: LLM) -> None:
    app = FastAPI()
    mount_openai_api(app, llm, MODEL)
    paths = app.openapi()["paths"]
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(paths)


def test_mounts_on_a_gradio_console(llm: LLM, tmp_path: Path) -> None:
    """As app/server.py does: routes on a FastAPI app that Gradio is then mounted on at the root."""
    gr = pytest.importorskip("gradio")
    app = FastAPI()
    mount_openai_api(app, llm, MODEL)
    with gr.Blocks() as demo:
        gr.Markdown("console")
    app = gr.mount_gradio_app(app, demo, path="")
    with serve(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        # Greedy: OpenAI's default temperature 1 lets the random tiny model sample EOS within 3 tokens now and then.
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, stream=True
        )
        chunks = list(stream)
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
        assert httpx.get(base, timeout=30).status_code == 200  # the console still answers at /


def test_loadtest_against_the_server(url: str, llm: LLM) -> None:
    import asyncio

    from benchmarks.loadtest import main, run, summarize

    summary = summarize(asyncio.run(run(url, clients=3, duration_s=1.0, max_tokens=8, grace_s=10)))
    assert summary["requests"] >= 3 and summary["errors"] == 0 and summary["unfinished"] == 0
    assert summary["output_tokens"] == 8 * summary["requests"]
    assert summary["ttft_ms"]["p50"] > 0 and summary["output_tokens_per_s"] > 0
    wait_idle(llm)
    with pytest.raises(SystemExit):
        main(["--url", "http://example.com:8000", "--clients", "2", "--duration", "1"])
    with pytest.raises(SystemExit):
        main(["--url", url, "--clients", "100000", "--duration", "1"])
