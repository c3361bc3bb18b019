"""langchain-tests' standard suites for ChatSpecDesk, unedited, with tool calling and structured output on.

Features SpecDesk does not serve (image/audio/PDF inputs, per-call model override) are declared through the
suites' properties. The integration suite runs twice:

* on a tiny random-weight engine (quick: it checks plumbing), where the tests that need a model to follow
  the prompt (call magic_function with input 3, write a joke's setup and punchline as JSON) are skipped with
  that reason: random weights write the tool call or JSON the grammar allows, never the one asked for;
* on the default model (`slow`), only those tests: `ChatSpecDesk()` as a user builds it.

The suite forbids overriding its tests, so tests/engine/conftest.py sorts them at collection and gives every
remaining skip its reason (text-only models, one model per engine, no network, no environment).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from specdesk.engine.llm import LLM
from specdesk.langchain import ChatSpecDesk
from tests.tiny_models import make_tiny_model

# The suites' async tests carry no marker of their own (langchain projects run asyncio_mode=auto), and
# the suite forbids overriding its tests, so a module mark runs them; pytest-asyncio then warns about
# each sync test, which is expected here.
pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'"),
]


@functools.cache
def shared_llm() -> LLM:
    # One engine for the whole suite: the fixtures build a fresh chat model per test.
    tmp = tempfile.mkdtemp(prefix="specdesk-lc-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    # The tools section is long in the tiny tokenizer (about a token per character): a longer context.
    path = make_tiny_model("qwen2", Path(tmp), max_position_embeddings=4096)
    return LLM(model=str(path), dtype="float32", device="cpu", num_blocks=512, attention_backend="torch")


class TestChatSpecDeskUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSpecDesk]:
        return ChatSpecDesk

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Unit tests never generate: a path that does not exist proves construction loads nothing.
        return {"model": "/not/loaded/tiny-qwen2"}

    @property
    def supports_model_override(self) -> bool:
        return False


class _SpecDeskIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSpecDesk]:
        return ChatSpecDesk

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True  # Anthropic-format tools, tool_use and thinking blocks (text only: no image)


class TestChatSpecDeskIntegration(_SpecDeskIntegration):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Few tokens keep the suite quick; ignore_eos guarantees non-empty replies from random weights.
        return {"llm": shared_llm(), "max_tokens": 8, "ignore_eos": True}


@pytest.mark.slow
class TestChatSpecDeskDefaultModelIntegration(_SpecDeskIntegration):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # The built-in default model, greedy; room for a call or a short JSON joke.
        return {"max_tokens": 160, "engine_kwargs": {"device": "cpu"}}
