"""The demo back office that persona tools act on (app/tools_demo.py): orders, tickets and handovers.

Orders are shared demo data, seeded when their table is created (db/migrations.py); tickets and handovers
are written by tool calls and belong to the conversation (and agent) that made them, so they go with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from specdesk.db.models import MAX_NAME_CHARS, Base, UTCDateTime, utcnow


class DemoOrder(Base):
    __tablename__ = "demo_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_number: Mapped[str] = mapped_column(String(32), unique=True)
    customer_name: Mapped[str] = mapped_column(String(MAX_NAME_CHARS))
    email: Mapped[str] = mapped_column(String(MAX_NAME_CHARS))
    status: Mapped[str] = mapped_column(String(32))  # placed, packed, shipped, delivered, delayed
    items: Mapped[str] = mapped_column(Text)
    total: Mapped[str] = mapped_column(String(32))
    carrier: Mapped[str] = mapped_column(String(64), default="", server_default="")
    tracking_number: Mapped[str] = mapped_column(String(64), default="", server_default="")
    estimated_delivery: Mapped[str] = mapped_column(String(32), default="", server_default="")

    def as_dict(self) -> dict[str, Any]:
        return {
            "order_number": self.order_number, "customer_name": self.customer_name, "status": self.status,
            "items": self.items, "total": self.total, "carrier": self.carrier or None,
            "tracking_number": self.tracking_number or None, "estimated_delivery": self.estimated_delivery or None,
        }  # fmt: skip


class Ticket(Base):
    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    agent: Mapped[str | None] = mapped_column(String(MAX_NAME_CHARS), default=None, index=True)
    subject: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    priority: Mapped[str] = mapped_column(String(16), default="normal", server_default="normal")
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticket_id": f"T-{self.id:05d}", "subject": self.subject, "priority": self.priority,
            "status": self.status, "created_at": self.created_at.isoformat(),
        }  # fmt: skip


class Handover(Base):
    __tablename__ = "handovers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    agent: Mapped[str | None] = mapped_column(String(MAX_NAME_CHARS), default=None, index=True)
    reason: Mapped[str] = mapped_column(Text)
    urgency: Mapped[str] = mapped_column(String(16), default="normal", server_default="normal")
    queue: Mapped[str] = mapped_column(String(64), default="team leads", server_default="team leads")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def as_dict(self) -> dict[str, Any]:
        return {
            "handover_id": f"H-{self.id:05d}", "queue": self.queue, "urgency": self.urgency,
            "status": "waiting for a human", "created_at": self.created_at.isoformat(),
        }  # fmt: skip


# Seeded once, when demo_orders is created: what `lookup_order` finds in a fresh database.
DEMO_ORDERS: tuple[dict[str, str], ...] = (
    {"order_number": "NW-1001", "customer_name": "Dana Whitfield", "email": "dana@example.com", "status": "shipped",
     "items": "Linen duvet cover (double)", "total": "89.00 EUR", "carrier": "DHL",
     "tracking_number": "JD014600003828", "estimated_delivery": "2026-12-07"},
    {"order_number": "NW-1002", "customer_name": "Eve Marsh", "email": "eve@example.com", "status": "delayed",
     "items": "Noise-cancelling headphones", "total": "249.00 EUR", "carrier": "UPS",
     "tracking_number": "1Z999AA10123456784", "estimated_delivery": "2026-11-28"},
    {"order_number": "NW-1003", "customer_name": "Ravi Patel", "email": "ravi@example.com", "status": "packed",
     "items": "Running shoes (42), 2 pairs of socks", "total": "132.50 EUR"},
    {"order_number": "NW-1004", "customer_name": "Mia Svensson", "email": "mia@example.com", "status": "delivered",
     "items": "Espresso machine", "total": "399.00 EUR", "carrier": "DPD",
     "tracking_number": "01234567890123", "estimated_delivery": "2026-11-30"},
)  # fmt: skip
