"""/v1 sampling parity through the official openai client: penalties, min_p, logit_bias and logprobs in
OpenAI's wire shapes (chat and completions, whole and streamed), and a 400 naming each bad parameter."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from specdesk.engine.llm import LLM
from specdesk.engine.sampling_params import SamplingParams
from tests.app.test_api import MESSAGES, MODEL, client, finals, llm, url  # noqa: F401  (shared fixtures)


def test_penalties_and_min_p_reach_the_engine(client: openai.OpenAI, llm: LLM) -> None:  # noqa: F811
    extra = {"repetition_penalty": 1.3, "min_p": 0.05}
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, frequency_penalty=0.7, presence_penalty=0.4,
        extra_body=extra,
    )  # fmt: skip
    params = SamplingParams(max_tokens=12, frequency_penalty=0.7, presence_penalty=0.4, **extra)
    expected = llm.chat([dict(m) for m in MESSAGES], params)
    assert r.choices[0].message.content == expected.text
    plain = llm.chat([dict(m) for m in MESSAGES], SamplingParams(max_tokens=12))
    assert expected.token_ids != plain.token_ids  # the penalties changed something (the tiny model repeats)


def test_logit_bias_forces_a_token(client: openai.OpenAI, llm: LLM) -> None:  # noqa: F811
    token_id = llm.tokenizer.encode(" order")[0]
    r = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logit_bias={str(token_id): 100}
    )
    assert r.choices[0].text == llm.tokenizer.decode([token_id] * 4)


def test_chat_logprobs(client: openai.OpenAI, llm: LLM) -> None:  # noqa: F811
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 8 and "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.bytes == list(t.token.encode("utf-8")) and t.logprob <= 0
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the best one
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    streamed = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [(t.token, t.top_logprobs[1].token) for t in tokens] == [(t.token, t.top_logprobs[1].token) for t in content]
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in content], abs=1e-5)
    # Without logprobs asked, none are sent.
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(client: openai.OpenAI) -> None:  # noqa: F811
    r = client.completions.create(model=MODEL, prompt="My order number is", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # greedy: the emitted token is the best; two partial-UTF-8 tokens share the text "\ufffd" (one key)
        assert 1 <= len(top) <= 2 and token in top and logprob == pytest.approx(max(top.values()))
    stream = client.completions.create(
        model=MODEL, prompt="My order number is", max_tokens=6, temperature=0, logprobs=2, stream=True
    )
    chunks = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens or []] == lp.tokens
    assert [o for c in chunks for o in c.text_offset or []] == lp.text_offset


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"hello": 1}}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_out_of_range_sampling_gets_400(url: str, overrides: dict[str, Any], param: str) -> None:  # noqa: F811
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **overrides}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_completion_logprobs_out_of_range(url: str) -> None:  # noqa: F811
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "logprobs": 21}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_refusals_name_the_field_they_are_about(url: str) -> None:  # noqa: F811
    bias = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "logit_bias": {"99999999": 5}}
    r = httpx.post(f"{url}/v1/chat/completions", json=bias, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[z-a]"}}}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "response_format", r.text
    assert len(error["message"]) > len("structured output json_schema is invalid: regex parse error:") + 5, error


@pytest.mark.parametrize("family", ["llama", "granite"])
def test_logprob_bytes_rebuild_characters_split_across_tokens(
    family: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from transformers import AutoTokenizer

    from specdesk.app.api_logprobs import TokenTexts
    from tests.tiny_models import make_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(family, tmp_path_factory.mktemp(family)))
    texts = TokenTexts(tokenizer)
    text = "café 😀 ok ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in texts(i) for i in ids), "no token splits a character: the test would not see a bug"
    assert bytes(b for i in ids for b in texts.bytes_of(i)).decode("utf-8").strip() == text
