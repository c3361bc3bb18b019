"""The demo tools behind the personas' tool files: what Run does for each declared function.

Each takes the call's checked arguments and where it runs (the conversation and its agent) and returns the
JSON-ready result the model reads back. A result the customer should hear about as a failure ("no such
order") is a result too, with an "error" key; only a broken database raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from specdesk.db.tool_repository import ToolRepository


@dataclass(frozen=True)
class ToolContext:
    """Where a call runs: its conversation, and the signed-in agent (None with login off)."""

    repository: ToolRepository
    conversation_id: int
    agent: str | None


Tool = Callable[[dict[str, Any], ToolContext], dict[str, Any]]


def lookup_order(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    order = ctx.repository.find_order(str(args["order_number"]))
    if order is None:
        return {"error": f"no order {args['order_number']!s} was found; check the number with the customer"}
    return order


def create_ticket(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    ticket = ctx.repository.create_ticket(
        ctx.conversation_id, str(args["subject"]), str(args.get("description", "")),
        str(args.get("priority", "normal")), agent=ctx.agent,
    )  # fmt: skip
    return {**ticket, "note": "ticket opened; give the customer its id"}


def escalate_to_human(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    handover = ctx.repository.record_handover(
        ctx.conversation_id, str(args["reason"]), str(args.get("urgency", "normal")), agent=ctx.agent
    )
    return {**handover, "note": "a team lead takes over; tell the customer they will be contacted"}


TOOLS: dict[str, Tool] = {
    "lookup_order": lookup_order,
    "create_ticket": create_ticket,
    "escalate_to_human": escalate_to_human,
}
