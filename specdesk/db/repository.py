"""ChatRepository: every SQL statement SpecDesk runs, behind methods that return plain records.

Each method is one short transaction. Writes take the write lock up front (see db.session.writer)
and commit before returning, so the customer's message is durable before generation starts and no
write transaction is ever open while tokens stream: the chat service calls start_assistant_message,
streams (checkpointing the text so far with save_partial_reply, each its own short transaction, so a
crash loses little), then finish_assistant_message.

Scoping: conversation-level methods take an optional ``agent`` (a login name). Given one, they only see
that agent's conversations, and another agent's conversation raises NotFoundError exactly like a
missing one, so ids reveal nothing. ``agent=None`` is unscoped: the console with login off.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Delete, Engine, Select, Update, delete, func, or_, select, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from specdesk.db import export
from specdesk.db.models import (
    MAX_NAME_CHARS,
    MAX_PERSONA_CHARS,
    MAX_TITLE_CHARS,
    Conversation,
    Feedback,
    Message,
    utcnow,
)
from specdesk.db.records import (
    ConversationRecord,
    ConversationStatus,
    ConversationSummary,
    FeedbackRecord,
    MessageRecord,
    MessageStatus,
    NotFoundError,
    Role,
)
from specdesk.db.session import writer

DEFAULT_TITLE = "New conversation"
# What a reply left PENDING (the process died, or its final write failed) is marked with.
INTERRUPTED_ERROR = "interrupted: the reply stopped before it was saved; the text drafted so far is kept"


class ChatRepository:
    """Conversations, messages and feedback. Safe to share between threads (no session is kept)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine  # also behind db/tool_repository.py's ToolRepository
        self._reader = sessionmaker(engine, expire_on_commit=False)
        self._writer = sessionmaker(writer(engine), expire_on_commit=False)

    # -- conversations -------------------------------------------------------------------------------

    def create_conversation(
        self,
        title: str = DEFAULT_TITLE,
        *,
        customer_name: str = "",
        persona: str = "general",
        agent: str | None = None,
    ) -> ConversationRecord:
        """Create an open, empty conversation, owned by ``agent`` when one is given."""
        row = Conversation(
            title=_clean_title(title),
            customer_name=_check_text(customer_name, "customer_name", max_chars=MAX_NAME_CHARS).strip(),
            persona=_check_persona(persona),
            agent=None if agent is None else _check_text(agent, "agent", MAX_NAME_CHARS),
        )
        with self._write() as session:
            session.add(row)
            session.flush()
            return row.to_record(with_messages=False)

    def list_conversations(
        self, search: str | None = None, *, limit: int = 200, agent: str | None = None
    ) -> list[ConversationSummary]:
        """Newest activity first. ``search`` matches title, customer name or any message, ignoring case."""
        num_messages = (
            select(func.count(Message.id)).where(Message.conversation_id == Conversation.id).scalar_subquery()
        )
        stmt = _owned_by(
            select(Conversation, num_messages).order_by(Conversation.updated_at.desc(), Conversation.id.desc()),
            agent,
        )
        term = (search or "").strip()
        if term:
            pattern = f"%{_escape_like(_check_text(term, 'search'))}%"
            in_messages = (
                select(Message.id)
                .where(Message.conversation_id == Conversation.id, Message.content.ilike(pattern, escape="\\"))
                .exists()
            )
            stmt = stmt.where(
                or_(
                    Conversation.title.ilike(pattern, escape="\\"),
                    Conversation.customer_name.ilike(pattern, escape="\\"),
                    in_messages,
                )
            )
        with self._reader() as session:
            rows = session.execute(stmt.limit(limit)).all()
            return [conversation.to_summary(count) for conversation, count in rows]

    def get_conversation(self, conversation_id: int, *, agent: str | None = None) -> ConversationRecord:
        """The conversation with its messages (and their feedback) ordered by position."""
        stmt = _owned_by(
            select(Conversation)
            .where(Conversation.id == conversation_id)
            .options(selectinload(Conversation.messages).selectinload(Message.feedback)),
            agent,
        )
        with self._reader() as session:
            row = session.scalars(stmt).one_or_none()
            if row is None:
                raise NotFoundError("conversation", conversation_id)
            return row.to_record(with_messages=True)

    def update_conversation(
        self,
        conversation_id: int,
        *,
        title: str | None = None,
        customer_name: str | None = None,
        persona: str | None = None,
        status: ConversationStatus | None = None,
        agent: str | None = None,
    ) -> None:
        """Change any of the given fields; the others stay as they are."""
        values: dict[str, Any] = {"updated_at": utcnow()}
        if title is not None:
            values["title"] = _clean_title(title)
        if customer_name is not None:
            values["customer_name"] = _check_text(customer_name, "customer_name", MAX_NAME_CHARS).strip()
        if persona is not None:
            values["persona"] = _check_persona(persona)
        if status is not None:
            values["status"] = ConversationStatus(status)
        with self._write() as session:
            result = session.execute(
                _owned_by(update(Conversation).where(Conversation.id == conversation_id), agent).values(values)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError("conversation", conversation_id)

    def rename_conversation(self, conversation_id: int, title: str, *, agent: str | None = None) -> None:
        self.update_conversation(conversation_id, title=title, agent=agent)

    def delete_conversation(self, conversation_id: int, *, agent: str | None = None) -> None:
        """Delete the conversation; its messages and their feedback go with it (ON DELETE CASCADE)."""
        with self._write() as session:
            result = session.execute(_owned_by(delete(Conversation).where(Conversation.id == conversation_id), agent))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError("conversation", conversation_id)

    # -- messages ------------------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: Role,
        content: str,
        *,
        status: MessageStatus = MessageStatus.COMPLETE,
        agent: str | None = None,
    ) -> MessageRecord:
        """Append a message and commit before returning (invariant 6: the customer's text is durable)."""
        role = Role(role)
        _check_text(content, "content")
        if role is Role.USER and not content.strip():
            raise ValueError("a customer message cannot be empty")
        with self._write() as session:
            return append_message(
                session, conversation_id, agent, role=role, content=content, status=MessageStatus(status)
            )

    def start_assistant_message(self, conversation_id: int, *, agent: str | None = None) -> MessageRecord:
        """An empty PENDING reply, stored before streaming so its id and position are known."""
        return self.add_message(conversation_id, Role.ASSISTANT, "", status=MessageStatus.PENDING, agent=agent)

    def finish_assistant_message(
        self,
        message_id: int,
        content: str,
        status: MessageStatus = MessageStatus.COMPLETE,
        metrics: Mapping[str, Any] | None = None,
        error: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> MessageRecord:
        """Store the final text, how the reply ended (complete/stopped/error), its metrics and the tool calls
        it proposes (OpenAI's shape; db/tool_repository.py stores their results)."""
        status = MessageStatus(status)
        if status is MessageStatus.PENDING:
            raise ValueError("finish_assistant_message needs a final status, not pending")
        _check_text(content, "content")
        with self._write() as session:
            row = _get(session, Message, message_id, "message")
            if row.role is not Role.ASSISTANT:
                raise ValueError(f"message {message_id} is a {row.role.value} message, not an assistant reply")
            row.content = content
            row.status = status
            row.error = None if error is None else _check_text(error, "error")
            row.metrics = None if metrics is None else dict(metrics)
            row.tool_calls = tool_calls or None
            row.conversation.updated_at = utcnow()
            session.flush()
            return row.to_record()

    def update_message_content(self, message_id: int, content: str, *, agent: str | None = None) -> MessageRecord:
        """Replace a message's text (the agent edits the last customer message before a retry)."""
        _check_text(content, "content")
        with self._write() as session:
            row = _get_message(session, message_id, agent)
            if row.role is Role.USER and not content.strip():
                raise ValueError("a customer message cannot be empty")
            row.content = content
            row.conversation.updated_at = utcnow()
            session.flush()
            return row.to_record()

    def delete_messages_after(self, conversation_id: int, position: int, *, agent: str | None = None) -> int:
        """Delete the messages with position > ``position`` (retry/edit); returns how many went."""
        with self._write() as session:
            conversation = _get_conversation(session, conversation_id, agent)
            result = session.execute(
                delete(Message).where(Message.conversation_id == conversation_id, Message.position > position)
            )
            conversation.updated_at = utcnow()
            return int(result.rowcount)  # type: ignore[attr-defined]

    def get_message(self, message_id: int) -> MessageRecord:
        stmt = select(Message).where(Message.id == message_id).options(selectinload(Message.feedback))
        with self._reader() as session:
            row = session.scalars(stmt).one_or_none()
            if row is None:
                raise NotFoundError("message", message_id)
            return row.to_record()

    def save_partial_reply(self, message_id: int, content: str) -> bool:
        """Checkpoint the text streamed so far into a PENDING reply (one short transaction).

        Only a reply that is still PENDING is touched, so a late checkpoint never overwrites a finished
        one. Returns whether a row was updated.
        """
        _check_text(content, "content")
        with self._write() as session:
            result = session.execute(
                update(Message)
                .where(Message.id == message_id, Message.status == MessageStatus.PENDING)
                .values(content=content)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def fail_pending_messages(self, error: str = INTERRUPTED_ERROR, *, conversation_id: int | None = None) -> int:
        """Mark replies left PENDING as errors, keeping their checkpointed text; returns how many.

        Called once at start (a crash left them) and, for one conversation, when a new turn starts in
        it (a reply whose final write failed). The caller guarantees no turn is streaming into them.
        """
        stmt = update(Message).where(Message.status == MessageStatus.PENDING)
        if conversation_id is not None:
            stmt = stmt.where(Message.conversation_id == conversation_id)
        with self._write() as session:
            result = session.execute(stmt.values(status=MessageStatus.ERROR, error=_check_text(error, "error")))
            return int(result.rowcount)  # type: ignore[attr-defined]

    # -- feedback ------------------------------------------------------------------------------------

    def set_feedback(
        self, message_id: int, rating: int, comment: str = "", *, agent: str | None = None
    ) -> FeedbackRecord:
        """Rate an assistant reply +1 or -1; a second call updates the same row."""
        if rating not in (1, -1):
            raise ValueError(f"rating must be +1 or -1, got {rating!r}")
        _check_text(comment, "comment")
        with self._write() as session:
            message = _get_message(session, message_id, agent)
            if message.role is not Role.ASSISTANT:
                raise ValueError(f"only assistant replies take feedback; message {message_id} is {message.role.value}")
            row = session.scalars(select(Feedback).where(Feedback.message_id == message_id)).one_or_none()
            if row is None:
                row = Feedback(message_id=message_id, rating=rating, comment=comment)
                session.add(row)
            else:
                row.rating, row.comment, row.updated_at = rating, comment, utcnow()
            session.flush()
            return row.to_record()

    def get_feedback(self, message_id: int) -> FeedbackRecord | None:
        with self._reader() as session:
            row = session.scalars(select(Feedback).where(Feedback.message_id == message_id)).one_or_none()
            return None if row is None else row.to_record()

    def clear_feedback(self, message_id: int, *, agent: str | None = None) -> bool:
        """Remove the rating of a message; False when there was none."""
        with self._write() as session:
            if agent is not None:
                _get_message(session, message_id, agent)
            result = session.execute(delete(Feedback).where(Feedback.message_id == message_id))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    # -- export --------------------------------------------------------------------------------------

    def export_json(self, conversation_id: int, *, agent: str | None = None) -> dict[str, Any]:
        """A JSON-serialisable dict of the conversation, its messages, metrics and feedback."""
        return export.to_dict(self.get_conversation(conversation_id, agent=agent))

    def export_markdown(self, conversation_id: int, *, agent: str | None = None) -> str:
        """A readable Markdown transcript of the conversation."""
        return export.to_markdown(self.get_conversation(conversation_id, agent=agent))

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writer.begin() as session:
            yield session


def append_message(session: Session, conversation_id: int, agent: str | None, **values: Any) -> MessageRecord:
    """Add a message at the conversation's next position inside `session`'s write transaction."""
    # The next position is read, then written: writers to one conversation must take turns. SQLite's
    # BEGIN IMMEDIATE already serializes them; elsewhere (PostgreSQL) the conversation's row lock does.
    session.execute(select(Conversation.id).where(Conversation.id == conversation_id).with_for_update())
    conversation = _get_conversation(session, conversation_id, agent)
    last = session.scalar(select(func.max(Message.position)).where(Message.conversation_id == conversation_id))
    row = Message(conversation_id=conversation_id, position=0 if last is None else last + 1, **values)
    session.add(row)
    conversation.updated_at = utcnow()
    session.flush()
    return row.to_record()


def _get(session: Session, model: type[Conversation] | type[Message], row_id: int, kind: str) -> Any:
    row = session.get(model, row_id)
    if row is None:
        raise NotFoundError(kind, row_id)
    return row


_Statement = TypeVar("_Statement", Select[Any], Update, Delete)


def _owned_by(stmt: _Statement, agent: str | None) -> _Statement:
    """Restrict a statement on conversations to ``agent``'s rows; unscoped when agent is None."""
    return stmt if agent is None else stmt.where(Conversation.agent == agent)


def _get_conversation(session: Session, conversation_id: int, agent: str | None) -> Conversation:
    row: Conversation = _get(session, Conversation, conversation_id, "conversation")
    if agent is not None and row.agent != agent:
        raise NotFoundError("conversation", conversation_id)  # same as missing: existence is not leaked
    return row


def _get_message(session: Session, message_id: int, agent: str | None) -> Message:
    row: Message = _get(session, Message, message_id, "message")
    if agent is not None and row.conversation.agent != agent:
        raise NotFoundError("message", message_id)
    return row


def _check_text(value: str, field: str, max_chars: int | None = None) -> str:
    # Lone surrogates (broken UTF-8 decoded with surrogateescape) would fail deep in the driver.
    if not isinstance(value, str):
        raise TypeError(f"{field} must be str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} is not valid UTF-8 text: {exc.reason} at position {exc.start}") from None
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"{field} is {len(value)} characters; at most {max_chars}")
    return value


def _clean_title(title: str) -> str:
    title = " ".join(_check_text(title, "title").split())
    return title[:MAX_TITLE_CHARS] or DEFAULT_TITLE


def _check_persona(persona: str) -> str:
    persona = _check_text(persona, "persona", MAX_PERSONA_CHARS).strip()
    if not persona:
        raise ValueError("persona key cannot be empty")
    return persona


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
