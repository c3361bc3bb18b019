"""Schema upgrades: a newer app opens a file written by an older one without losing rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Connection, text

from specdesk.db import ChatRepository, MessageStatus, Role, make_engine
from specdesk.db.migrations import (
    MIGRATIONS,
    Migration,
    SchemaTooNewError,
    current_version,
    latest_version,
    upgrade_schema,
)
from specdesk.db.session import writer
from specdesk.db.tool_repository import ToolRepository

# The shape of a pre-versioning file: no schema_version, no feedback table, no customer_name / persona
# on conversations, no error / metrics on messages, no index on updated_at.
_LEGACY_DDL = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY,
    title VARCHAR(200) NOT NULL,
    status VARCHAR(16) NOT NULL,
    created_at DATETIME NOT NULL,
    updated_at DATETIME NOT NULL
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role VARCHAR(16) NOT NULL,
    content TEXT NOT NULL,
    status VARCHAR(16) NOT NULL,
    created_at DATETIME NOT NULL,
    UNIQUE (conversation_id, position)
);
INSERT INTO conversations VALUES (1, 'Old ticket', 'open', '2024-01-02 03:04:05', '2024-01-02 03:04:05');
INSERT INTO messages VALUES (1, 1, 0, 'user', 'My router blinks red', 'complete', '2024-01-02 03:04:05');
INSERT INTO messages VALUES (2, 1, 1, 'assistant', 'Please restart it.', 'complete', '2024-01-02 03:04:06');
"""


def _write_legacy_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.executescript(_LEGACY_DDL)
    conn.close()


def _columns(path: Path, table: str) -> set[str]:
    return {row[1] for row in sqlite3.connect(path).execute(f"PRAGMA table_info({table})")}


def test_fresh_database_is_stamped_with_the_latest_version(db_path: Path) -> None:
    engine = make_engine(f"sqlite:///{db_path}")
    assert current_version(engine) == latest_version(MIGRATIONS)


def test_legacy_file_is_upgraded_in_place(db_path: Path) -> None:
    _write_legacy_file(db_path)
    engine = make_engine(f"sqlite:///{db_path}")

    assert {"customer_name", "persona"} <= _columns(db_path, "conversations")
    assert {"error", "metrics"} <= _columns(db_path, "messages")
    indexes = {row[1] for row in sqlite3.connect(db_path).execute("PRAGMA index_list(conversations)")}
    assert "ix_conversations_updated_at" in indexes
    assert current_version(engine) == latest_version(MIGRATIONS)

    repo = ChatRepository(engine)
    old = repo.get_conversation(1)
    assert old.title == "Old ticket"
    assert (old.customer_name, old.persona) == ("", "general")  # server defaults filled old rows
    assert [m.content for m in old.messages] == ["My router blinks red", "Please restart it."]
    assert old.messages[0].metrics is None and old.messages[0].error is None
    # New features work on old rows: feedback (new table), new messages continue the positions.
    repo.set_feedback(2, 1, "solved it")
    reply = repo.start_assistant_message(1)
    assert reply.position == 2
    repo.finish_assistant_message(reply.id, "Done", MessageStatus.COMPLETE, metrics={"ttft_s": 0.2})
    assert repo.get_conversation(1).messages[1].feedback is not None
    engine.dispose()


def test_version_1_file_without_owners_gains_the_agent_column(db_path: Path) -> None:
    """A file written before per-agent scoping (schema 1, no conversations.agent) upgrades in place."""
    make_engine(f"sqlite:///{db_path}").dispose()
    with sqlite3.connect(db_path) as conn:  # roll the fresh file back to the version 1 shape
        conn.executescript(
            "DROP INDEX ix_conversations_agent; ALTER TABLE conversations DROP COLUMN agent;"
            "UPDATE schema_version SET version = 1;"
            "INSERT INTO conversations (id, title, customer_name, persona, status, created_at, updated_at)"
            " VALUES (1, 'Before login', '', 'general', 'open', '2025-01-02 03:04:05', '2025-01-02 03:04:05');"
        )
    conn.close()
    assert "agent" not in _columns(db_path, "conversations")

    engine = make_engine(f"sqlite:///{db_path}")
    assert "agent" in _columns(db_path, "conversations")
    indexes = {row[1] for row in sqlite3.connect(db_path).execute("PRAGMA index_list(conversations)")}
    assert "ix_conversations_agent" in indexes
    assert current_version(engine) == latest_version(MIGRATIONS) >= 2
    repo = ChatRepository(engine)
    assert repo.get_conversation(1).agent is None  # old rows stay unowned: only login-off lists them
    assert repo.list_conversations(agent="alice") == []
    mine = repo.create_conversation("After login", agent="alice")
    assert [c.id for c in repo.list_conversations(agent="alice")] == [mine.id]
    assert {c.id for c in repo.list_conversations()} == {1, mine.id}
    engine.dispose()


def test_version_3_file_is_rebuilt_so_that_no_id_is_ever_reused(db_path: Path) -> None:
    """A file from before AUTOINCREMENT (schema 3) keeps every row and every reference through the rebuild, and
    a deleted newest conversation's id (or message's) no longer goes to the next one."""
    engine = make_engine(f"sqlite:///{db_path}")
    repo = ChatRepository(engine)
    kept, newest = repo.create_conversation("Kept"), repo.create_conversation("Newest")
    question = repo.add_message(kept.id, Role.USER, "Where is my parcel?")
    reply = repo.add_message(kept.id, Role.ASSISTANT, "On its way.")
    repo.set_feedback(reply.id, 1, "quick")
    ticket = ToolRepository(engine).create_ticket(kept.id, "Trace the parcel")
    engine.dispose()
    with sqlite3.connect(db_path) as conn:  # roll the tables back to the version 3 shape (no AUTOINCREMENT)
        for table in ("conversations", "messages"):
            ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = ?", (ddl.replace(" AUTOINCREMENT", ""), table))
        conn.execute("DELETE FROM sqlite_sequence")
        conn.execute("UPDATE schema_version SET version = 3")
    conn.close()

    engine = make_engine(f"sqlite:///{db_path}")
    assert current_version(engine) == latest_version(MIGRATIONS) >= 4
    ddl = dict(sqlite3.connect(db_path).execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert "AUTOINCREMENT" in ddl["conversations"] and "AUTOINCREMENT" in ddl["messages"]
    assert "_old_" not in " ".join(ddl)  # the renamed tables are gone
    assert sqlite3.connect(db_path).execute("PRAGMA foreign_key_check").fetchall() == []
    repo = ChatRepository(engine)
    old = repo.get_conversation(kept.id)
    assert [(m.id, m.content) for m in old.messages] == [(question.id, question.content), (reply.id, reply.content)]
    assert old.messages[1].feedback is not None and old.messages[1].feedback.comment == "quick"
    tickets = ToolRepository(engine).list_tickets(conversation_id=kept.id)
    assert [t["ticket_id"] for t in tickets] == [ticket["ticket_id"]]
    repo.delete_conversation(newest.id)
    assert repo.create_conversation("Next").id > newest.id
    repo.delete_conversation(kept.id)  # cascades still reach messages, feedback and tickets
    assert ToolRepository(engine).list_tickets(conversation_id=kept.id) == []
    assert repo.add_message(repo.create_conversation("Later").id, Role.USER, "hi").id > reply.id
    engine.dispose()


def test_versioned_steps_run_in_order_exactly_once(db_path: Path) -> None:
    _write_legacy_file(db_path)
    engine = make_engine(f"sqlite:///{db_path}", create_schema=False)
    calls: list[int] = []

    base = latest_version(MIGRATIONS)

    def retitle(conn: Connection) -> None:
        calls.append(base + 1)
        conn.execute(text("UPDATE conversations SET title = title || ' (migrated)'"))

    def note(conn: Connection) -> None:
        calls.append(base + 2)

    steps = (*MIGRATIONS, Migration(base + 1, "retitle", retitle), Migration(base + 2, "note", note))
    assert upgrade_schema(writer(engine), steps) == base + 2
    assert upgrade_schema(writer(engine), steps) == base + 2  # second start: nothing left to run
    assert calls == [base + 1, base + 2]
    assert current_version(engine) == base + 2
    assert ChatRepository(engine).get_conversation(1).title == "Old ticket (migrated)"
    engine.dispose()


def test_fresh_database_skips_versioned_steps(db_path: Path) -> None:
    engine = make_engine(f"sqlite:///{db_path}", create_schema=False)
    calls: list[str] = []
    next_version = latest_version(MIGRATIONS) + 1
    steps = (*MIGRATIONS, Migration(next_version, "would fail on an empty db", lambda conn: calls.append("ran")))
    assert upgrade_schema(writer(engine), steps) == next_version
    assert calls == []  # create_all already produced the current shape
    engine.dispose()


def test_database_from_a_newer_app_is_refused(db_path: Path) -> None:
    make_engine(f"sqlite:///{db_path}").dispose()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(SchemaTooNewError, match="99"):
        make_engine(f"sqlite:///{db_path}")


def test_migration_versions_must_increase(db_path: Path) -> None:
    engine = make_engine(f"sqlite:///{db_path}", create_schema=False)
    steps = (Migration(2, "b", lambda conn: None), Migration(1, "a", lambda conn: None))
    with pytest.raises(AssertionError, match="strictly increase"):
        upgrade_schema(engine, steps)
    engine.dispose()
