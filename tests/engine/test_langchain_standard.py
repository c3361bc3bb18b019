"""langchain-tests' standard suites for ChatSpecDesk, unedited. Unsupported features (tool calling,
structured output, JSON mode, image/audio/PDF inputs, per-call model override) are declared through the
suites' properties; the integration suite runs on a tiny random-weight engine (it checks plumbing)."""

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
    path = make_tiny_model("qwen2", Path(tmp))
    return LLM(model=str(path), dtype="float32", device="cpu", num_blocks=128, attention_backend="torch")


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


class TestChatSpecDeskIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSpecDesk]:
        return ChatSpecDesk

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Few tokens keep the suite quick; ignore_eos guarantees non-empty replies from random weights.
        return {"llm": shared_llm(), "max_tokens": 8, "ignore_eos": True}

    @property
    def supports_model_override(self) -> bool:
        return False
