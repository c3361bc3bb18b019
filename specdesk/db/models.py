"""SQLAlchemy 2.0 typed ORM models: conversations, their messages, and feedback on replies.

Only db/repository.py and db/migrations.py touch these classes; everything else sees db/records.py,
which is what ``to_record`` builds (read every attribute inside the session, hand out the copy).

Every NOT NULL column added after the first release needs a constant ``server_default``: that is what
lets db/migrations.py add it to an older database file with a plain ``ALTER TABLE ... ADD COLUMN``.
"""

from __future__ import annotations

import copy
import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from specdesk.db.records import (
    ConversationRecord,
    ConversationStatus,
    ConversationSummary,
    FeedbackRecord,
    MessageRecord,
    MessageStatus,
    Role,
)

MAX_TITLE_CHARS = 200
MAX_NAME_CHARS = 200
MAX_PERSONA_CHARS = 64
MAX_CALL_ID_CHARS = 64


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC.

    SQLite has no time zone type, so an aware datetime would come back naive and compare wrongly
    against ``utcnow()``; normalising at the boundary keeps every datetime in the app aware.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


def _enum_column(enum_cls: type[enum.Enum]) -> Enum:
    # Store the lowercase values ("user"), not member names ("USER"): exports and ad-hoc SQL read them.
    return Enum(
        enum_cls,
        native_enum=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"
    # SQLite would hand a deleted newest conversation's id to the next one (max(id) + 1), and a tab still
    # showing the deleted one would write into the new one; AUTOINCREMENT never reuses an id (migration 4).
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(MAX_TITLE_CHARS))
    customer_name: Mapped[str] = mapped_column(String(MAX_NAME_CHARS), default="", server_default="")
    # Key of a prompts/personas/*.txt file; kept as text so removing a persona never breaks old rows.
    persona: Mapped[str] = mapped_column(String(MAX_PERSONA_CHARS), default="general", server_default="general")
    status: Mapped[ConversationStatus] = mapped_column(
        _enum_column(ConversationStatus), default=ConversationStatus.OPEN, server_default="open"
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # The login name that owns the conversation; None when it was created with login off (unscoped).
    agent: Mapped[str | None] = mapped_column(String(MAX_NAME_CHARS), default=None, index=True)

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.position",
        cascade="all, delete-orphan",
        passive_deletes=True,  # let the database's ON DELETE CASCADE do the work in one statement
    )

    def to_record(self, *, with_messages: bool) -> ConversationRecord:
        messages = tuple(m.to_record() for m in self.messages) if with_messages else ()
        return ConversationRecord(
            id=self.id,
            title=self.title,
            customer_name=self.customer_name,
            persona=self.persona,
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            messages=messages,
            agent=self.agent,
        )

    def to_summary(self, num_messages: int) -> ConversationSummary:
        return ConversationSummary(
            id=self.id,
            title=self.title,
            customer_name=self.customer_name,
            persona=self.persona,
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            num_messages=int(num_messages),
            agent=self.agent,
        )


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # Also serves as the index for "messages of a conversation, in order".
        UniqueConstraint("conversation_id", "position", name="uq_messages_conversation_position"),
        {"sqlite_autoincrement": True},  # a tab's message ids (feedback, edits) never name another's message
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[Role] = mapped_column(_enum_column(Role))
    content: Mapped[str] = mapped_column(Text, default="", server_default="")
    status: Mapped[MessageStatus] = mapped_column(
        _enum_column(MessageStatus), default=MessageStatus.COMPLETE, server_default="complete"
    )
    error: Mapped[str | None] = mapped_column(Text, default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A reply's proposed tool calls (OpenAI's shape); on a tool message, the id of the call it answers.
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    tool_call_id: Mapped[str | None] = mapped_column(String(MAX_CALL_ID_CHARS), default=None)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")
    feedback: Mapped[Feedback | None] = relationship(
        back_populates="message", cascade="all, delete-orphan", passive_deletes=True, uselist=False
    )

    def to_record(self) -> MessageRecord:
        return MessageRecord(
            id=self.id,
            conversation_id=self.conversation_id,
            position=self.position,
            role=self.role,
            content=self.content,
            status=self.status,
            error=self.error,
            metrics=None if self.metrics is None else dict(self.metrics),
            created_at=self.created_at,
            feedback=None if self.feedback is None else self.feedback.to_record(),
            tool_calls=copy.deepcopy(self.tool_calls),
            tool_call_id=self.tool_call_id,
        )


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (CheckConstraint("rating IN (-1, 1)", name="ck_feedback_rating"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # unique: one feedback row per message, updated in place when the agent changes their mind
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    rating: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    message: Mapped[Message] = relationship(back_populates="feedback")

    def to_record(self) -> FeedbackRecord:
        return FeedbackRecord(
            message_id=self.message_id,
            rating=self.rating,
            comment=self.comment,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


# One row holding the number of the last versioned migration applied (see db/migrations.py).
schema_version = Table(
    "schema_version",
    Base.metadata,
    Column("version", Integer, nullable=False),
)
