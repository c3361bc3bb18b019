"""The `specdesk` command: nothing heavy at import, and a terminal chat on the real engine + SQLite."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from specdesk.app.cli import build_parser, main, run_chat
from specdesk.app.settings import Settings
from specdesk.db import ChatRepository, Role, make_engine
from specdesk.engine.config import EngineConfig
from tests.app.console_fixtures import CONTEXT_TOKENS
from tests.tiny_models import make_tiny_model


def test_importing_the_app_loads_no_model() -> None:
    code = (
        "import sys, specdesk, specdesk.app.cli, specdesk.app.server, specdesk.app.ui, specdesk.app.chat_service;"
        "heavy = [m for m in ('torch', 'transformers', 'specdesk.engine.llm') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""


def test_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "--speculator" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dance"])
    assert main(["serve", "--port", "99999"]) == 2
    assert "port must be in 1..65535" in capsys.readouterr().err


def test_terminal_chat_streams_and_stores(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path, max_position_embeddings=CONTEXT_TOKENS)
    db_url = f"sqlite:///{tmp_path / 'chat.db'}"
    engine = EngineConfig(model=str(model), device="cpu", dtype="float32")
    settings = Settings(engine=engine, db_url=db_url, max_tokens=12, temperature=0.0)
    typed = "/personas\nHello, where is my order?\n/macro greeting\n/macro nope\n/retry\n/quit\n"
    out = io.StringIO()
    assert run_chat(settings, "retail", "Dana", stdin=io.StringIO(typed), out=out) == 0
    text = out.getvalue()
    assert "retail" in text and "agent> " in text
    assert "12 tokens" in text and "prompt tokens reused from cache" in text
    assert "Hi Dana, thanks for contacting Northwind" in text
    assert "no macro named 'nope'" in text

    repository = ChatRepository(make_engine(db_url))
    conversation = repository.get_conversation(repository.list_conversations()[0].id)
    assert conversation.persona == "retail" and conversation.customer_name == "Dana"
    # The greeting macro followed the first reply; /retry replaced everything after the customer's message.
    assert [m.role for m in conversation.messages] == [Role.USER, Role.ASSISTANT]
