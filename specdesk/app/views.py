"""How records look on screen: chat bubbles, status lines, metric cards, sidebar rows and plot frames.

Pure functions from records to strings, lists and data frames, so they are tested without a browser.
Every string that reaches the chat's Markdown renderer passes through app/safe_markdown.py.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from specdesk.app import tools_view
from specdesk.app.safe_markdown import clean_model_markdown, escape_customer_text
from specdesk.app.tools import pending_call
from specdesk.app.turns import TurnState, TurnUpdate
from specdesk.db import ConversationRecord, ConversationSummary, MessageRecord, MessageStatus, Role

LIKE, DISLIKE = "Like", "Dislike"
_STATUS_SUFFIX = {
    MessageStatus.STOPPED: "\n\n*— stopped; partial reply kept*",
    MessageStatus.ERROR: "\n\n*⚠ the reply failed*",
    MessageStatus.PENDING: "\n\n*… interrupted*",
}


def chat_messages(
    conversation: ConversationRecord | None, *, include_pending: bool = False
) -> tuple[list[dict[str, Any]], list[int]]:
    """(chatbot messages, the message id behind each one) for a conversation.

    Customer text is escaped so it shows as typed; drafted replies keep their Markdown, minus HTML
    and images. System messages never show. Tool calls and results show as titled bubbles (tools_view).
    """
    shown: list[dict[str, Any]] = []
    ids: list[int] = []
    names, answers = tools_view.call_facts(conversation)
    waiting = pending_call(conversation) if conversation else None
    for message in conversation.messages if conversation else ():
        if message.role is Role.SYSTEM:
            continue
        if message.status is MessageStatus.PENDING and not include_pending:
            continue
        if message.role is Role.TOOL or message.tool_calls:
            parts = tools_view.bubbles(message, names, answers, waiting=waiting.call_id if waiting else None)
            shown += parts
            ids += [message.id] * len(parts)
            continue
        shown.append({"role": message.role.value, "content": bubble_text(message)})
        ids.append(message.id)
    return shown, ids


def bubble_text(message: MessageRecord) -> str:
    if message.role is Role.USER:
        return escape_customer_text(message.content)
    text = clean_model_markdown(message.content)
    if message.status is MessageStatus.ERROR and message.error:
        return (text + "\n\n" if text else "") + f"*⚠ {escape_customer_text(message.error)}*"
    return (text or "*(no text)*") + _STATUS_SUFFIX.get(message.status, "")


def live_bubble(update: TurnUpdate) -> dict[str, Any]:
    """The reply being drafted, as it streams (a tool call being written shows as a card: tools_view)."""
    drafting = tools_view.live_call(update.text) if update.text else None
    if drafting is not None:
        return drafting
    text = clean_model_markdown(update.text) if update.text else ""
    if not update.state.is_final:
        text += " ▍"  # a caret, so a waiting turn never looks like an empty bubble
    return {"role": "assistant", "content": text}


def feedback_values(conversation: ConversationRecord | None) -> list[str | None]:
    """One entry per assistant bubble, in order: what the chatbot shows as already liked/disliked."""
    values: list[str | None] = []
    for message in conversation.messages if conversation else ():
        if message.status is MessageStatus.PENDING or message.role not in (Role.ASSISTANT, Role.TOOL):
            continue
        if message.role is Role.TOOL or message.tool_calls:  # tool bubbles take no rating
            values += [None] * (bool(message.content.strip()) + len(message.tool_calls or ()) or 1)
            continue
        rating = message.feedback.rating if message.feedback else 0
        values.append(LIKE if rating > 0 else DISLIKE if rating < 0 else None)
    return values


def status_line(update: TurnUpdate) -> str:
    """One short line under the chat saying what the turn is doing or how it ended."""
    notes = []
    if update.num_dropped_messages:
        notes.append(
            f"ℹ️ {update.num_dropped_messages} oldest message(s) left out so the conversation fits the "
            "model's context window."
        )
    if update.notice:
        notes.append(f"ℹ️ {escape_customer_text(update.notice)}")
    m = update.metrics
    if update.state is TurnState.WAITING:
        head = "⏳ Waiting for the engine…"
    elif update.state is TurnState.STREAMING:
        head = f"✍️ Drafting… {update.num_tokens} tokens · {update.elapsed_s:.1f} s"
    elif update.state is TurnState.COMPLETE:
        head = f"✅ Reply ready · {update.num_tokens} tokens in {update.elapsed_s:.1f} s"
    elif update.state is TurnState.STOPPED:
        head = f"⏹️ Stopped · partial reply kept ({update.num_tokens} tokens)"
    else:
        head = f"⚠️ {escape_customer_text(update.error or 'the reply failed')}"
    if m.get("num_cached_tokens"):
        head += f" · **{m['num_cached_tokens']} prompt tokens reused from cache**"
    return "  \n".join([head, *notes])


def metrics_card(metrics: dict[str, Any] | None) -> str:
    """The last turn's numbers as a small HTML grid (values are numbers we produced, escaped anyway)."""
    m = metrics or {}
    rows = [
        ("Time to first token", _seconds(m.get("ttft_s"))),
        ("Tokens / s", _number(m.get("decode_tokens_per_s"), "{:.1f}")),
        ("Tokens / step", _number(m.get("tokens_per_step"), "{:.2f}")),
        ("Cached prompt tokens", _cached(m)),
        ("Generated tokens", _number(m.get("num_generated_tokens"), "{}")),
        ("Total time", _seconds(m.get("total_s"))),
    ]
    cells = "".join(f'<div class="metric"><span>{html.escape(k)}</span><b>{html.escape(v)}</b></div>' for k, v in rows)
    return f'<div class="metric-grid">{cells}</div>'


def turns_frame(conversation: ConversationRecord | None) -> pd.DataFrame:
    """One row per finished reply with its speed and time to first token, for the session plot."""
    rows = []
    replies = [m for m in (conversation.messages if conversation else ()) if m.role is Role.ASSISTANT]
    for number, message in enumerate(replies, start=1):
        m = message.metrics or {}
        if m.get("decode_tokens_per_s") is None:
            continue
        rows.append(
            {
                "turn": f"{number:02d}",  # a label, not a number: one bar per turn, however few
                "tokens/s": float(m["decode_tokens_per_s"]),
                "TTFT (ms)": round(1000 * float(m.get("ttft_s") or 0.0)),
                "cached prompt tokens": int(m.get("num_cached_tokens") or 0),
            }
        )
    # Explicit dtypes: the plot picks its axis types from the first (empty) frame it sees.
    frame = pd.DataFrame(rows, columns=["turn", "tokens/s", "TTFT (ms)", "cached prompt tokens"])
    return frame.astype(
        {"turn": "object", "tokens/s": "float64", "TTFT (ms)": "int64", "cached prompt tokens": "int64"}
    )


def header(conversation: ConversationRecord | None, persona_titles: dict[str, str]) -> str:
    if conversation is None:
        return "### New conversation\nPaste the customer's message below: a conversation starts with it."
    persona = persona_titles.get(conversation.persona, conversation.persona)
    customer = conversation.customer_name or "customer not named"
    title = escape_customer_text(conversation.title)
    return f"### {title}\n{escape_customer_text(persona)} · {escape_customer_text(customer)}"


def sidebar_choices(summaries: list[ConversationSummary]) -> list[tuple[str, int]]:
    """(label, id) rows: title, customer, and when it last moved."""
    choices = []
    for s in summaries:
        who = f" · {s.customer_name}" if s.customer_name else ""
        choices.append((f"{s.title}{who} · {_when(s.updated_at)}", s.id))
    return choices


def title_from(text: str, limit: int = 48) -> str:
    """A conversation title from the first customer message."""
    words = " ".join(text.split())
    return words if len(words) <= limit else words[: limit - 1].rsplit(" ", 1)[0] + "…"


def _when(moment: datetime) -> str:
    local = moment.astimezone()
    if local.date() == datetime.now(timezone.utc).astimezone().date():
        return local.strftime("%H:%M")
    return local.strftime("%d %b")


def _seconds(value: Any) -> str:
    if value is None:
        return "—"
    return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.2f} s"


def _number(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _cached(m: dict[str, Any]) -> str:
    if m.get("num_prompt_tokens") is None:
        return "—"
    return f"{m.get('num_cached_tokens', 0)} of {m['num_prompt_tokens']}"


def engine_line(stats: Any, model_name: str, speculator: str | None, sampling: str = "") -> str:
    """The engine's load in one muted line: what an agent checks when replies feel slow; then the sampling
    defaults every draft uses."""
    queried = stats.prefix_queried_tokens
    hits = f"{stats.prefix_hit_tokens / queried:.0%}" if queried else "—"
    parts = [
        f"<b>{html.escape(model_name)}</b>",
        f"speculator: {html.escape(speculator) if speculator else 'off'}",
        f"{stats.num_running} running · {stats.num_waiting} waiting",
        f"KV cache {stats.kv_usage:.0%} used",
        f"prefix cache hits {hits}",
    ]
    if sampling:
        parts.append(f"sampling: {html.escape(sampling)}")
    return "<br>".join(parts)
