"""Faults mid-turn: the database failing and the server killed. Nothing typed or streamed is lost beyond
a checkpoint, no conversation is left stuck, and the agent is told."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from specdesk.app import views
from specdesk.app.chat_service import ChatService
from specdesk.app.safe_markdown import clean_model_markdown
from specdesk.app.turns import TurnState
from specdesk.db import ChatRepository, MessageStatus, Role, make_engine
from specdesk.engine.llm import LLM
from tests.app.console_fixtures import CONTEXT_TOKENS, make_service, tiny_console_llm
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    engine = tiny_console_llm(tmp_path_factory.mktemp("faults"))
    yield engine
    engine.shutdown()


@pytest.fixture
def service(llm: LLM, tmp_path: Path) -> ChatService:
    chat = make_service(llm, tmp_path / "specdesk.db", max_tokens=48)
    chat.checkpoint_interval_s = 0.0  # checkpoint every delta: the tests see the partial text stored
    return chat


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_engine_idle(llm: LLM) -> None:
    def idle() -> bool:
        s = llm.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_blocks

    wait_until(idle, what="the engine to go idle")


def _database_down(*_args: object, **_kwargs: object) -> None:
    raise OperationalError("UPDATE messages", {}, Exception("disk I/O error"))


def test_a_failed_final_write_leaves_the_conversation_usable(
    service: ChatService, llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = service.new_conversation()
    with monkeypatch.context() as patch:
        patch.setattr(service.repository, "finish_assistant_message", _database_down)
        updates = list(service.send(conversation.id, "Where is my refund?"))
    final = updates[-1]
    # The agent is told, and still has the drafted text to copy.
    assert final.state is TurnState.ERROR and final.error is not None and "could not be saved" in final.error
    assert final.text and final.num_tokens == 48
    assert not service.is_running(conversation.id)
    assert not service.stop(conversation.id)  # nothing left running for Stop to find
    wait_engine_idle(llm)

    # The database is back: the next turn runs, and the reply that could not be saved is marked
    # interrupted with the text checkpointed while it streamed.
    again = list(service.send(conversation.id, "Hello?"))[-1]
    assert again.state is TurnState.COMPLETE
    messages = service.repository.get_conversation(conversation.id).messages
    assert [(m.role, m.status) for m in messages] == [
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.ERROR),
        (Role.USER, MessageStatus.COMPLETE),
        (Role.ASSISTANT, MessageStatus.COMPLETE),
    ]
    assert messages[1].content and final.text.startswith(messages[1].content)
    assert messages[1].error is not None and messages[1].error.startswith("interrupted")


@pytest.mark.parametrize("failing", ["start_assistant_message", "get_conversation", "save_partial_reply"])
def test_the_database_failing_mid_turn_never_leaves_a_turn_running(
    service: ChatService, llm: LLM, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    conversation = service.new_conversation()
    with monkeypatch.context() as patch:
        patch.setattr(service.repository, failing, _database_down)
        final = list(service.send(conversation.id, "My parcel is late"))[-1]
    if failing == "save_partial_reply":  # a lost checkpoint costs durability only, never the reply
        assert final.state is TurnState.COMPLETE
    else:
        assert final.state is TurnState.ERROR and final.error is not None and "disk I/O error" in final.error
    assert not service.is_running(conversation.id)
    wait_engine_idle(llm)
    assert list(service.send(conversation.id, "Any news?"))[-1].state is TurnState.COMPLETE


def test_a_stream_closed_while_the_database_is_down_still_frees_the_conversation(
    service: ChatService, llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = service.new_conversation()
    updates = service.send(conversation.id, "Tell me everything", service.sampling_params(max_tokens=4000))
    for update in updates:
        if update.num_tokens >= 3 and update.text:  # some text streamed (a token may be part of a character)
            break
    with monkeypatch.context() as patch:
        patch.setattr(service.repository, "finish_assistant_message", _database_down)
        updates.close()  # the browser went away; storing the stopped reply fails
    assert not service.is_running(conversation.id)
    wait_engine_idle(llm)
    reply = service.repository.get_conversation(conversation.id).messages[-1]
    assert reply.status is MessageStatus.PENDING and reply.content  # checkpointed, marked at next start


# ---- a real server process, killed with SIGKILL mid-reply -----------------------------------------

_SERVER = """
import dataclasses
import sys
import uvicorn
from specdesk.app.server import build_service, create_app
from specdesk.app.settings import Settings

model, db, port = sys.argv[1:4]
engine = dict(model=model, device="cpu", dtype="float32", speculator=None, attention_backend="torch")
common = dict(db_url=f"sqlite:///{db}", temperature=0.0, max_tokens=6000)
if "engine" in {f.name for f in dataclasses.fields(Settings)}:  # the engine's own config inside
    from specdesk.engine.config import EngineConfig

    settings = Settings(engine=EngineConfig(**engine), **common)
else:
    settings = Settings(model=model, speculator="none", device="cpu", dtype="float32",
                        engine_kwargs={"attention_backend": "torch"}, **common)
service = build_service(settings)
uvicorn.run(create_app(service, settings), host="127.0.0.1", port=int(port), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(script: Path, model: Path, db: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, str(script), str(model), str(db), str(port)],
        cwd=root, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout_s=240, what="the server to start")
    return process, url


def _reply_rows(db: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        query = "SELECT content, status, error FROM messages WHERE role = 'assistant' ORDER BY id"
        return list(conn.execute(query))


def test_sigkill_mid_reply_keeps_the_checkpointed_text_marked_interrupted(tmp_path: Path) -> None:
    from gradio_client import Client

    model = make_tiny_model("llama", tmp_path / "model", max_position_embeddings=CONTEXT_TOKENS)
    db, script, log = tmp_path / "specdesk.db", tmp_path / "server.py", tmp_path / "server.log"
    script.write_text(_SERVER)
    process, url = _start_server(script, model, db, log)
    try:
        client = Client(url, verbose=False)
        client.submit("My order 48213 never arrived.", "general", "", "", api_name="/send")
        # Wait for a checkpoint (about a second of streaming), then kill the process outright.
        wait_until(lambda: any(s == "pending" and c for c, s, _ in _reply_rows(db)), 120, "a checkpointed reply")
        time.sleep(1.5)  # let a few more checkpoints land: the reply must still be streaming when killed
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    [(checkpointed, status, _)] = _reply_rows(db)
    assert status == "pending" and checkpointed  # written by the checkpoint, not by a final write

    process, url = _start_server(script, model, db, log)  # a new server on the same database
    try:
        [(content, status, error)] = _reply_rows(db)
        assert (content, status) == (checkpointed, "error") and error is not None and error.startswith("interrupted")
        repository = ChatRepository(make_engine(f"sqlite:///{db}"))
        [summary] = repository.list_conversations()
        shown, _ = views.chat_messages(repository.get_conversation(summary.id))
        assert [m["role"] for m in shown] == ["user", "assistant"]
        assert "48213" in shown[0]["content"]
        assert shown[1]["content"].startswith(clean_model_markdown(checkpointed)[:20])
        assert "interrupted" in shown[1]["content"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
