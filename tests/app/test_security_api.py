"""/v1 access and limits: each key is its own prefix-cache tenant; bodies, fan-out, odd JSON and odd
parameters are refused in OpenAI's error shape before the engine sees anything."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from specdesk.app.api import mount_openai_api
from specdesk.app.api_schemas import MAX_BODY_BYTES
from specdesk.engine.llm import LLM
from tests.app.live_server import serve, tiny_llm, wait_idle

MODEL = "specdesk-tiny"
KEYS = ("sk-tenant-a", "sk-tenant-b")


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_llm(tmp_path_factory.mktemp("security-api"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(llm: LLM) -> Iterator[str]:
    app = FastAPI()
    mount_openai_api(app, llm, MODEL, api_keys=list(KEYS))
    with serve(app) as base:
        yield base


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def cached_tokens(url: str, key: str, text: str, **extra: Any) -> int:
    r = client(url, key).completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0, extra_body=extra)
    assert r.usage and r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.cached_tokens is not None
    return r.usage.prompt_tokens_details.cached_tokens


def test_prefix_cache_is_shared_only_within_a_key(url: str, llm: LLM) -> None:
    # Several full pages, so a shared prefix would show up as cached tokens.
    secret = "Customer 58213 says the refund for order 9917 went to the wrong card ending 4421. " * 3
    assert len(llm.encode(secret)) > 48
    assert cached_tokens(url, KEYS[0], secret) == 0  # the first run
    assert cached_tokens(url, KEYS[1], secret) == 0  # another key cannot learn that A sent it
    assert cached_tokens(url, KEYS[0], secret) > 0  # A's own repeat still reuses its pages
    # A client salt only narrows sharing within the tenant: B naming any salt still sees nothing of A's,
    # and A's salted requests share with each other but not with A's unsalted ones.
    assert cached_tokens(url, KEYS[1], secret, cache_salt="x") == 0
    assert cached_tokens(url, KEYS[0], secret, cache_salt="x") == 0
    assert cached_tokens(url, KEYS[0], secret, cache_salt="x") > 0
    wait_idle(llm)


def post(url: str, content: bytes, content_type: str | None = "application/json", path: str = "/v1/completions",
         **headers: str) -> httpx.Response:  # fmt: skip
    if content_type is not None:
        headers["Content-Type"] = content_type
    headers["Authorization"] = f"Bearer {KEYS[0]}"
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30)


def assert_refused(r: httpx.Response, status: int, llm: LLM, steps_before: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert llm.stats().num_steps == steps_before  # refused before reaching the engine
    return error


def test_a_large_body_is_refused_fast(url: str, llm: LLM) -> None:
    before = llm.stats().num_steps
    big = json.dumps({"model": MODEL, "prompt": "refund " * 600_000, "max_tokens": 1}).encode()
    assert len(big) > 4 * MAX_BODY_BYTES
    start = time.perf_counter()
    error = assert_refused(post(url, big), 413, llm, before)
    assert error["code"] == "request_too_large" and time.perf_counter() - start < 2.0

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = httpx.post(
        f"{url}/v1/completions", content=chunks(), timeout=30,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"},
    )  # fmt: skip
    assert_refused(r, 413, llm, before)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "specdesk-tiny", "prompt": "\\ud800 refund", "max_tokens": 2}',
        b'{"model": "specdesk-tiny", "prompt": "x", "max_tokens": 2, "user": "\\udfff"}',
        b'{"model": "specdesk-tiny", "prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "specdesk-tiny", "prompt": "x", "extra": ' + b"[" * 40 + b"]" * 40 + b"}",
        b'{"model": "specdesk-tiny", "prompt": "\xff\xfe"}',
    ],
    ids=["lone-surrogate-prompt", "lone-surrogate-elsewhere", "nested-past-the-stack", "nested-40", "bad-utf8"],
)
def test_odd_json_gets_400_not_500(url: str, llm: LLM, raw: bytes) -> None:
    before = llm.stats().num_steps
    error = assert_refused(post(url, raw), 400, llm, before)
    assert error["type"] == "invalid_request_error"


def test_only_json_bodies_start_a_generation(url: str, llm: LLM) -> None:
    """A cross-site form post (or a `text/plain` fetch, which needs no preflight) cannot generate."""
    before = llm.stats().num_steps
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data", None):
        assert_refused(post(url, body, content_type), 415, llm, before)
    assert post(url, body, "application/json; charset=utf-8").status_code == 200


@pytest.mark.parametrize(
    ("prompts", "n", "param"),
    [(65, 1, "prompt"), (1, 17, "n"), (5, 16, "n"), (1, 0, "n")],
)
def test_fan_out_is_capped(url: str, llm: LLM, prompts: int, n: int, param: str) -> None:
    before = llm.stats().num_steps
    body = {"model": MODEL, "prompt": ["refund please"] * prompts, "n": n, "max_tokens": 1}
    error = assert_refused(post(url, json.dumps(body).encode()), 400, llm, before)
    assert error["param"] == param


def test_the_largest_fan_out_still_runs(url: str, llm: LLM) -> None:
    ok = client(url, KEYS[0]).completions.create(model=MODEL, prompt=["hi"] * 4, n=16, max_tokens=1, temperature=0)
    assert len(ok.choices) == 64
    wait_idle(llm)


def test_a_chat_body_is_checked_the_same_way(url: str, llm: LLM) -> None:
    before = llm.stats().num_steps
    chat = f"{url}/v1/chat/completions"
    form = httpx.post(chat, data={"model": MODEL}, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30)
    assert_refused(form, 415, llm, before)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}
    raw = json.dumps(body).encode()  # ensure_ascii: the lone surrogate travels as "\ud800"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"}
    r = httpx.post(chat, content=raw, headers=headers, timeout=30)
    assert_refused(r, 400, llm, before)


def chat_body(**extra: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "refund"}], **extra}).encode()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body(stop=[f"s{i}" for i in range(17)], max_tokens=2), "stop"),  # each checked after every token
        (chat_body(stop=["x" * 1001], max_tokens=2), "stop"),
        (chat_body(max_tokens=2, stream_options={"include_usage": True}), "stream_options"),  # OpenAI: 400
        (chat_body(max_tokens=2, logit_bias={"\u00b2": 1.0}), "logit_bias"),  # "²".isdigit(), but no token id
        (chat_body(max_tokens=2, logit_bias={"\u0663": 1.0}), "logit_bias"),  # Arabic-Indic 3 is not token 3
    ],
    ids=["17-stops", "long-stop", "stream-options-without-stream", "superscript-key", "arabic-digit-key"],
)
def test_odd_parameters_get_400_naming_them(url: str, llm: LLM, body: bytes, param: str) -> None:
    before = llm.stats().num_steps
    error = assert_refused(post(url, body, path="/v1/chat/completions"), 400, llm, before)
    assert error["param"] == param, error


def test_tool_call_arguments_nested_past_the_parser_get_400(url: str, llm: LLM) -> None:
    """The body's own nesting is capped; JSON inside an earlier call's arguments string is parsed later, and
    nested past Python's recursion limit it raised RecursionError: a 500."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 1100 + "]" * 1100}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]  # fmt: skip
    before = llm.stats().num_steps
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 2}).encode()
    error = assert_refused(post(url, body, path="/v1/chat/completions"), 400, llm, before)
    assert "arguments" in error["message"]


def test_a_completion_without_max_tokens_gets_openais_16(url: str, llm: LLM) -> None:
    r = client(url, KEYS[0]).completions.create(model=MODEL, prompt="refund", temperature=0,
                                                extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage is not None and r.usage.completion_tokens == 16
    wait_idle(llm)
