"""make_engine: pragmas really in effect, directories created, memory databases shared by threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from sqlalchemy import Engine

from specdesk.db import ChatRepository, Role, make_engine
from specdesk.db.session import BUSY_TIMEOUT_MS


def test_creates_parent_directory_and_schema(db_path: Path, engine: Engine) -> None:
    assert db_path.is_file()
    tables = {row[0] for row in sqlite3.connect(db_path).execute("SELECT name FROM sqlite_master")}
    assert {"conversations", "messages", "feedback", "schema_version"} <= tables


def test_pragmas_in_effect_on_every_new_connection(engine: Engine) -> None:
    # Two connections checked out at once are two distinct DBAPI connections: both must be set up.
    with engine.connect() as first, engine.connect() as second:
        for conn in (first, second):
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
            }
            assert pragma == {
                "journal_mode": "wal",
                "busy_timeout": BUSY_TIMEOUT_MS,
                "synchronous": 1,  # NORMAL
                "foreign_keys": 1,
            }


def test_wal_persists_in_the_file(db_path: Path, engine: Engine) -> None:
    # journal_mode=WAL is a property of the file: a plain sqlite3 connection sees it as well.
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_make_engine_is_idempotent_on_an_existing_file(db_path: Path, engine: Engine) -> None:
    repo = ChatRepository(engine)
    conversation = repo.create_conversation("Kept")
    again = make_engine(f"sqlite:///{db_path}")
    try:
        assert ChatRepository(again).get_conversation(conversation.id).title == "Kept"
    finally:
        again.dispose()


def test_in_memory_database_is_shared_across_threads() -> None:
    engine = make_engine("sqlite://")
    repo = ChatRepository(engine)
    conversation = repo.create_conversation("Memory")
    errors: list[BaseException] = []

    def write() -> None:
        try:
            repo.add_message(conversation.id, Role.USER, "from another thread")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert errors == []
    assert [m.content for m in repo.get_conversation(conversation.id).messages] == ["from another thread"]

    # Many threads writing at once take turns on the one connection: every message is stored, none lost.
    def write_many(i: int) -> None:
        try:
            for t in range(15):
                repo.add_message(conversation.id, Role.USER, f"{i}.{t}")
                repo.list_conversations("Memory")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write_many, args=(i,)) for i in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == [] and len(repo.get_conversation(conversation.id).messages) == 1 + 4 * 15
