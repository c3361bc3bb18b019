"""What a conversation turn reports while it runs: plain records the UI and the CLI render.

The chat service yields a `TurnUpdate` for every streamed delta and one final update whose `state` says
how the reply ended. Metrics are flattened into JSON-ready numbers, the shape stored with the message.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from specdesk.db import MessageStatus
from specdesk.engine import FinishReason, RequestMetrics, StreamDelta


class TurnState(str, Enum):
    WAITING = "waiting"  # stored, queued in the engine, no token yet
    STREAMING = "streaming"
    COMPLETE = "complete"
    STOPPED = "stopped"  # the agent pressed Stop or the browser went away: partial text kept
    ERROR = "error"

    @property
    def is_final(self) -> bool:
        return self in (TurnState.COMPLETE, TurnState.STOPPED, TurnState.ERROR)

    @property
    def message_status(self) -> MessageStatus:
        return {
            TurnState.COMPLETE: MessageStatus.COMPLETE,
            TurnState.STOPPED: MessageStatus.STOPPED,
            TurnState.ERROR: MessageStatus.ERROR,
        }.get(self, MessageStatus.PENDING)


@dataclass(frozen=True)
class TurnUpdate:
    """A snapshot of one turn. `text` is the whole reply so far, `delta` what is new since the last one."""

    conversation_id: int
    assistant_message_id: int | None
    state: TurnState
    text: str = ""
    delta: str = ""
    num_tokens: int = 0
    elapsed_s: float = 0.0
    num_dropped_messages: int = 0  # oldest history messages left out to fit the context window
    metrics: dict[str, Any] = field(default_factory=dict)  # final update only
    error: str | None = None
    notice: str | None = None  # something the agent should know that did not fail the turn (a failover)


# What a turn returns (ChatService.send, retry, edit_last, run_tool_call, ...): iterate it, or close it to stop.
TurnStream = Generator[TurnUpdate, None, None]


@dataclass
class TurnProgress:
    """The mutable state of one running turn, from which every TurnUpdate is built."""

    conversation_id: int
    start: float = field(default_factory=time.perf_counter)
    parts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_dropped_messages: int = 0
    reply_id: int | None = None  # the PENDING reply row, once stored
    deltas: Iterator[StreamDelta] | None = None  # the engine stream, once submitted
    checkpointed_at: float = 0.0  # perf_counter of the last checkpoint of the streamed text
    checkpointed_text: str = ""
    notice: str | None = None  # the engine's last word on how the reply was produced (e.g. a failover)
    tool_mode: str | None = None  # how the reply may hold tool calls (app/tools_service.py); None: it cannot

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def update(self, state: TurnState, delta: str = "", **extra: Any) -> TurnUpdate:
        return TurnUpdate(
            self.conversation_id, self.reply_id, state, self.text, delta, self.num_tokens, self.elapsed_s(),
            self.num_dropped_messages, **{"notice": self.notice, **extra},
        )  # fmt: skip


# The metrics stored per assistant message and shown beside the chat. Names carry their unit.
METRIC_KEYS = (
    "ttft_s",
    "decode_tokens_per_s",
    "tokens_per_step",
    "num_prompt_tokens",
    "num_cached_tokens",
    "num_generated_tokens",
    "num_decode_steps",
    "num_draft_tokens",
    "num_accepted_tokens",
    "num_preemptions",
)


def metrics_dict(
    metrics: RequestMetrics | None,
    *,
    total_s: float,
    finish_reason: FinishReason | None,
    num_dropped_messages: int,
    speculate: bool,
) -> dict[str, Any]:
    """The JSON-ready metrics of a finished turn (None values left out)."""
    out: dict[str, Any] = {"total_s": round(total_s, 4), "speculate": speculate}
    if metrics is not None:
        flat = metrics.as_dict()
        for key in METRIC_KEYS:
            value = flat.get(key)
            if value is not None:
                out[key] = round(value, 4) if isinstance(value, float) else value
    if finish_reason is not None:
        out["finish_reason"] = finish_reason.value
    if num_dropped_messages:
        out["num_dropped_messages"] = num_dropped_messages
    return out


def final_state(finish_reason: FinishReason | None, error: str | None) -> TurnState:
    """How a finished engine request maps onto a stored reply."""
    if error is not None or finish_reason is FinishReason.ERROR:
        return TurnState.ERROR
    if finish_reason is FinishReason.ABORT:
        return TurnState.STOPPED
    return TurnState.COMPLETE
