"""Shared by the console tests: one tiny engine per module, a real SQLite file per test, helpers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from specdesk.app.chat_service import ChatService
from specdesk.app.settings import Settings
from specdesk.db import ChatRepository, make_engine
from specdesk.engine.llm import LLM
from tests.tiny_models import make_tiny_model

# The personas' system prompts are long in the tiny tokenizer (~1.8k tokens): give the context room.
CONTEXT_TOKENS = 8192


def tiny_console_llm(tmp: Path, **engine_kwargs: object) -> LLM:
    """A random-weight llama (EOS never greedy-picked, so replies run to max_tokens) on CPU."""
    path = make_tiny_model("llama", tmp, max_position_embeddings=CONTEXT_TOKENS)
    return LLM(model=str(path), dtype="float32", device="cpu", attention_backend="torch", **engine_kwargs)


def make_service(llm: LLM, db_path: Path, **settings: object) -> ChatService:
    """A service on a real SQLite file; greedy unless the test says otherwise (exact token counts)."""
    repository = ChatRepository(make_engine(f"sqlite:///{db_path}"))
    return ChatService(llm, repository, Settings(**{"temperature": 0.0, **settings}))  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_engine_idle(llm: LLM, timeout_s: float = 15.0) -> None:
    """Nothing running or waiting, and every page free again (cached pages count as free)."""

    def idle() -> bool:
        s = llm.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_blocks

    wait_until(idle, timeout_s, f"the engine to go idle ({llm.stats()})")
