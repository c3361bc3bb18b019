"""Shared by the console tests: one tiny engine per module, a real SQLite file per test, helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from specdesk.app.chat_service import ChatService
from specdesk.app.console_actions import ConsoleActions
from specdesk.app.settings import Settings
from specdesk.db import ChatRepository, make_engine
from specdesk.engine.llm import LLM
from tests.helpers import wait_idle
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


@contextmanager
def console_actions(service: ChatService) -> Iterator[ConsoleActions]:
    """The Console tab's handlers on `service`, on components built (not served) in a throwaway Blocks."""
    from specdesk.app.ui_console import build_console  # the UI's modules only where a test builds it

    with gr.Blocks():
        view = build_console(service)
    actions = ConsoleActions(service, view)
    try:
        yield actions
    finally:
        actions.exports.close()


# The console tests' name for the shared wait (tests/helpers.py).
wait_engine_idle = wait_idle
