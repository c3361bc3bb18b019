"""db: conversation history in any SQLAlchemy database (SQLite by default).

Callers use make_engine + ChatRepository and get plain records back; ORM models stay inside db/.
"""

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
from specdesk.db.repository import ChatRepository
from specdesk.db.session import make_engine

__all__ = [
    "ChatRepository",
    "ConversationRecord",
    "ConversationStatus",
    "ConversationSummary",
    "FeedbackRecord",
    "MessageRecord",
    "MessageStatus",
    "NotFoundError",
    "Role",
    "make_engine",
]
